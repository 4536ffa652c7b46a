"""eval/evaluate.py's machinery: its config (config.py), what it evaluates (targets.py: runs, checkpoints, folders,
single files, the teacher), the prompts (prompts.py), the run over models (runner.py), parameter, MAC and latency
counting (cost.py) and the report and grids it writes (report.py)."""
