"""Where a flow's tasks run: Prefect's own task runners (threads), or Dask and Ray through
prefect-dask and prefect-ray (a local cluster, or an existing one at an address)."""

from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner

from stages.errors import UserError

RUNNERS = ("threads", "dask", "ray")


def task_runner_for(name: str, address: str | None = None, workers: int = 1):
    if name == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if name == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise UserError("--task-runner dask needs prefect-dask: "
                            "pip install -e '.[cluster]'") from None
        return DaskTaskRunner(address=address) if address else DaskTaskRunner()
    if name == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise UserError("--task-runner ray needs prefect-ray: "
                            "pip install -e '.[cluster]'") from None
        return RayTaskRunner(address=address) if address else RayTaskRunner()
    raise UserError(f"--task-runner {name!r}: choose threads, dask or ray")
