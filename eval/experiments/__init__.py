"""The toy-world experiments' machinery: KD runs launched as a user would (toy_runs.py), for eval/toy_ablation.py
and eval/rank_experiment.py."""
