"""`scripts/gpu_check.sh`: the one prepared GPU check (issue 23), runnable as `python -m drift_agent.gpucheck`.

Parts run in order of importance, each under its own time budget, and the report (JSON and Markdown) is
rewritten after every part, so a run that is killed keeps what it measured. `--dry-run` runs every part that
can run on CPU with a tiny random model, so CI tests the script itself.
"""
