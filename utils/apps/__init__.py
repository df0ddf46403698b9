"""App plumbing shared by the entry points: flags, model loading from flags, the terminal chat
loop, the tools' error tail (tool.py). The only package that imports argparse."""
