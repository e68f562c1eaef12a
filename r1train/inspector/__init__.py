"""The run inspector: per-token records written during training (records.py) and the one-page
HTML view of a run that `train.py inspect RUN_DIR` writes from them (page.py, page.js, page.css)."""
