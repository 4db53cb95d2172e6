"""The PLR paper's analyses as commands (``plr analyze KIND ...``).

One module per kind; each writes figures (PNG) with the numbers behind them
(CSV/JSON) and a ``SUMMARY.md`` into its output directory:

* ``ablation``    Table 3: full PLR vs w/o MoRS, w/o RCL, w/o KL (paired t-tests)
* ``sensitivity`` Figure 2: NDCG@20 / Recall@20 against M, T, lambda, dropout
* ``robustness``  Figure 3: NDCG@20 when 10-30% of each test history is dropped
* ``ceiling``     Figure 4: the oracle over every reasoning state vs the model
* ``attention``   Figure 5: attention maps of the streams and the gate weights
* ``efficiency``  Table 4: FLOPs and latency per sample, relative to SASRec
* ``groups``      (not in the paper) the paired test of finished runs per user group:
                  history length, target popularity
* ``history``     (not in the paper) how often the top of the list is an item of the
                  history, and the metrics with the history excluded
"""

KINDS = ("ablation", "sensitivity", "robustness", "ceiling", "attention", "efficiency", "groups", "history")
