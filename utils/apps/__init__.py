"""App plumbing shared by the entry points: flags, model loading from flags, the terminal chat loop. The only package that imports argparse."""
