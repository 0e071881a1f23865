"""Off the reading path: the demo corpus writer (synthetic.py), the demo CNN's classification
stage (pretrain_cnn.py) and the ablation driver (ablation.py). The reference files are the
top-level ones."""
