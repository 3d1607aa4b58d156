"""The mask methods, one module each; every module here registers itself when
``stages.masks`` is imported (see ``stages.masks.core.MaskMethod``)."""
