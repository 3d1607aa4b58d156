"""One source of defaults (the config dataclasses), presets as partial configs, and flags or
``--set section.field=value`` on top; method flags come from the method registry."""

from __future__ import annotations

import dataclasses

import pytest

from flows.cli import build_parser, config_of, refuse_ignored, settings
from flows.config import PRESETS, RunConfig, build_config, config_paths
from stages.errors import UserError
from stages.masks import METHODS


def parse(*argv: str):
    args = build_parser().parse_args(["run", *argv])
    return config_of(args), settings(args)


def test_without_flags_a_run_is_the_config_defaults_and_the_default_preset_is_empty():
    assert PRESETS["default"] == {}
    assert parse()[0] == RunConfig() == build_config()
    # the EBFT settings a deployment gets from YAML without naming them are the CLI's too
    assert (RunConfig().train.max_epochs, RunConfig().train.batch_size,
            RunConfig().distill.epochs) == (1, 1, 1)


def test_the_parser_holds_no_default_of_its_own():
    """Every flag that sets a field is absent from the parsed arguments unless given, so
    nothing but the config dataclasses can hold a default."""
    run = build_parser().parse_args(["run"])
    assert not [name for name in vars(run) if name.startswith("set:")]


@pytest.mark.parametrize("flags, lr, epochs, distill", [
    # our default: 10x the paper's rate (bench/vs_authors.py, bench/recovery.py), one block
    # epoch, then one of distillation (issue 22)
    ([], 2e-3, 1, 1),
    (["--preset", "paper"], 2e-4, 10, 0),  # the paper's own settings: no distillation
    (["--preset", "paper", "--lr", "5e-4"], 5e-4, 10, 0),  # a flag given wins over the preset
    (["--preset", "paper", "--set", "train.lr=5e-4"], 5e-4, 10, 0),  # and so does --set
    (["--preset", "paper", "--distill-epochs", "2"], 2e-4, 10, 2),
])
def test_presets_are_partial_configs_and_flags_win(flags, lr, epochs, distill):
    cfg, _ = parse(*flags)
    assert (cfg.train.lr, cfg.train.max_epochs, cfg.train.max_grad_norm,
            cfg.distill.epochs) == (lr, epochs, 1.0, distill)


def test_set_reaches_every_field_with_its_type():
    cfg, given = parse("--method", "sparsegpt", "--set", "prune.sparsegpt.percdamp=0.02",
                       "--set", "train.tolerance=0.05", "--set", "dense.eval_windows=all",
                       "--set", "prune.flap.bias=off", "--set", "zeroshot.tasks=piqa,boolq",
                       "--train-norms")
    assert cfg.prune.sparsegpt.percdamp == 0.02 and cfg.train.tolerance == 0.05
    assert cfg.dense.eval_windows is None and cfg.prune.flap.bias is False
    assert cfg.zeroshot.tasks == ("piqa", "boolq") and cfg.train.train_norms is True
    assert given["prune.sparsegpt.percdamp"][0] == "--set prune.sparsegpt.percdamp"
    assert set(config_paths()) >= {"dense.nsamples", "prune.ria.power", "lora.rank",
                                   "zeroshot.limit", "keep_boundaries"}


@pytest.mark.parametrize("flags, message", [
    (["--set", "train.tolerence=0.1"], "--set train.tolerence: no such setting"),
    (["--set", "tolerance=0.1"], "did you mean train.tolerance?"),
    (["--set", "train.lr"], "write SECTION.FIELD=VALUE"),
    (["--set", "train.lr=fast"], "--set train.lr 'fast': not a float"),
    (["--nsamples", "many"], "--nsamples 'many': not an integer"),
    (["--flap-bias", "maybe"], "--flap-bias 'maybe': not on or off"),
    (["--preset", "huge"], "--preset 'huge': choose default, paper"),
])
def test_bad_settings_are_one_line_errors_naming_the_flag(flags, message):
    with pytest.raises(UserError, match=message.replace("?", "\\?")):
        parse(*flags)


def test_every_parameter_of_every_method_is_a_flag_and_a_setting():
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    for name, cls in METHODS.items():
        for field in dataclasses.fields(cls):
            assert cls.flag(field.name) in help_text
            assert f"prune.{name}.{field.name}" in config_paths()


@pytest.mark.parametrize("flags, message", [
    (["--blocksize", "64"], ("--blocksize would be ignored: they set SparseGPT, and --method "
                            "wanda does not run it")),
    (["--set", "prune.sparsegpt.percdamp=0.02"], ("--set prune.sparsegpt.percdamp would be "
                                                  "ignored")),
    (["--method", "sparsegpt", "--ria-power", "1"], "--ria-power would be ignored"),
    (["--method", "sparsegpt", "--pattern", "2:4", "--sparsegpt-group", "row"],
     "--sparsegpt-group would be ignored: --pattern 2:4 prunes within each row's groups"),
    (["--finetune", "none", "--set", "train.tolerance=0.1"], "--finetune none trains nothing"),
    (["--method", "flap", "--mask-inputs", "dense"], "--mask-inputs would be ignored"),
])
def test_a_setting_the_run_would_ignore_is_refused(flags, message):
    cfg, given = parse(*flags)
    with pytest.raises(UserError, match=message):
        refuse_ignored(cfg, given)


@pytest.mark.parametrize("flags", [
    ["--tune", "mask", "--distill-epochs", "0"],
    ["--finetune", "none", "--distill-epochs", "0"],
    ["--finetune", "lora", "--distill-epochs", "0"],
])
def test_an_explicit_no_distillation_is_accepted_with_every_recipe(flags):
    cfg, given = parse(*flags)
    refuse_ignored(cfg, given)  # raises nothing
    assert cfg.distill.epochs == 0


def test_a_method_flag_reaches_the_mask_key():
    from flows.run import mask_spec_for

    cfg, _ = parse("--method", "ria", "--ria-power", "1.0")
    default, _ = parse("--method", "ria")
    spec, base = (mask_spec_for(c, "m", "a", "float32") for c in (cfg, default))
    assert spec.methods()[0].power == 1.0 and spec.key() != base.key()


def test_the_run_key_holds_only_the_parameters_of_the_methods_it_runs():
    """A parameter of a method the run does not use, or a method registered later, leaves
    the run's key (its report's identity) as it was; one it uses changes it."""
    from dataclasses import asdict

    from flows.config import PruneConfig
    from stages.masks import methods_run

    wanda = build_config("default", {"prune.method": "wanda"})
    assert build_config("default", {"prune.sparsegpt.percdamp": 0.02}).key() == wanda.key()
    obs = build_config("default", {"prune.method": "wanda+obs"})
    assert build_config("default", {"prune.method": "wanda+obs",
                                    "prune.obs.percdamp": 0.02}).key() != obs.key()
    section = methods_run(asdict(PruneConfig(method="wanda+obs")))
    assert {"wanda", "obs"} <= set(section) and "sparsegpt" not in section


def test_auto_choices_settle_from_the_rest_of_the_configuration():
    """OWL where one unstructured sparsity is asked for and fits, re-masking wherever blocks
    train one after another on masks of single weights; explicit choices are kept."""
    from flows.config import settled

    def choices(**sets):
        cfg = settled(build_config("default", sets))
        return cfg.prune.layer_sparsity, cfg.train.remask

    assert choices() == ("owl", True)
    assert choices(**{"prune.pattern": "2:4"}) == ("uniform", True)
    assert choices(**{"prune.method": "flap", "prune.sparsity": 0.2}) == ("uniform", False)
    assert choices(**{"train.block_inputs": "dense"}) == ("owl", False)
    assert choices(**{"prune.mask_inputs": "dense"}) == ("owl", False)
    assert choices(finetune="none") == ("owl", False)
    assert choices(**{"prune.sparsity": 0.9}) == ("uniform", True)  # 2 x 0.08 > 1 - 0.9
    assert choices(**{"prune.layer_sparsity": "uniform", "train.remask": "off"}) == \
        ("uniform", False)
    assert choices(**{"train.remask": "auto"}) == ("owl", True)
    paper = settled(build_config("paper"))
    assert (paper.prune.layer_sparsity, paper.train.remask) == ("uniform", False)
    assert settled(settled(RunConfig())) == settled(RunConfig())


def test_sparsegpt_dampening_is_heavier_only_where_ebft_trains_the_weights_after():
    """auto: 0.3 before EBFT on the weights (a better start, measured), the paper's 0.01
    for a pruned model alone, EBFT on the mask, LoRA and the paper preset; a value given
    is kept, and the CLI reads "auto"."""
    from flows.config import settled

    def percdamp(preset="default", **sets):
        return settled(build_config(preset, {"prune.method": "sparsegpt"} | sets)
                       ).prune.sparsegpt.percdamp

    assert RunConfig().prune.sparsegpt.percdamp is None
    assert percdamp() == 0.3
    assert percdamp(finetune="none") == percdamp(finetune="lora") == 0.01
    assert percdamp(**{"train.tune": "mask"}) == 0.01
    assert percdamp("paper") == 0.01
    assert percdamp(**{"prune.sparsegpt.percdamp": 0.05}) == 0.05
    cfg, _ = parse("--method", "sparsegpt", "--percdamp", "auto")
    assert cfg.prune.sparsegpt.percdamp is None and settled(cfg).prune.sparsegpt.percdamp == 0.3
