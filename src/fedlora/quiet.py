"""Keep third-party libraries quiet (CLI and Flower apps).

The hub is not switched off: a local folder or the embedded model never contacts it, and a
hub id in model.name_or_path is resolved as transformers would (cache, else download);
set HF_HUB_OFFLINE=1 to forbid downloads."""

import os


def quiet_libraries() -> None:
    """No tokenizer threads, and no library warnings or progress bars on our output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
