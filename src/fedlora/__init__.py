"""fedlora: federated LoRA fine-tuning over heterogeneous wireless networks.

    from fedlora import run, plan, compare
    result = run("configs/smoke.yaml", "runs/smoke", overrides=["train.rounds=2"])

The API (fedlora.api) is imported on first use, so `import fedlora.config` stays light.
"""

__all__ = ["compare", "load", "plan", "run"]


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedlora' has no attribute {name!r}")
