"""Every random stream of a run, in one place so that no two share an id.

A draw is seeded by (run seed, stream, round, client, ...) (numpy SeedSequence entropy
lists), so the same draw comes out whether the run was resumed or not, and whichever
method or engine asks for it.
"""

# the run (fedlora.setup, fedlora.loop)
STREAM_DATA = 1  # task subsets and the Dirichlet split
STREAM_PROFILES = 2  # generated client profiles
STREAM_EVAL = 3  # evaluation subsets
STREAM_INIT = 4  # the initial adapter
STREAM_BATCH = 5  # a client's minibatches in a round
STREAM_FADING = 6  # Rayleigh fading per round
STREAM_PROBE = 7  # the probe-loss questions

# the methods (fedlora.methods)
STREAM_Q = 11  # random per-client q (sampling baselines' rules)
STREAM_S = 12  # random per-client sketch ratios / ranks
STREAM_SAMPLE = 13  # independent participation coins
STREAM_SKETCH = 14  # which ranks a sketch keeps
STREAM_FIXED_SAMPLE = 15  # fixed-size sampled set, shared by fslora / hetlora / flora / flexlora
STREAM_FRESH_INIT = 16  # FLoRA's fresh A_i per (round, client)
STREAM_TSFA_BUDGET = 21  # TSFA's latency budget draw

# a replicate's training draws (train.replicate)
STREAM_REPLICATE = 31


def training_entropy(cfg) -> list[int]:
    """What every training stream is seeded from: [seed], or [seed, STREAM_REPLICATE, k] for
    train.replicate = k > 0 (the data split, profiles and evaluation questions keep [seed])."""
    k = cfg.train.replicate
    return [cfg.seed] if k == 0 else [cfg.seed, STREAM_REPLICATE, k]
