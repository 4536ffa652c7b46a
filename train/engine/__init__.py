"""What any run is made of, whatever it trains: the typed config every run shares (`RunConfig`), its loading, checks and
--help (config.py), the loop that steps, accumulates, logs, samples and checkpoints every task (loop.py, task.py),
checkpoints written whole or not at all (checkpoints.py), the run folder and its lock (run_folder.py),
process-count-free random draws (step_random.py), frozen models (frozen.py), agreement across processes
(distributed.py), console and trackers (console.py, tracking.py), sample grids (sampling.py) and what every trainer
command does (trainer_cli.py)."""
