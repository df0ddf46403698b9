"""Finetune CogAgent (LoRA by default; --use_qlora, --full) with DeepSpeed on the captcha or
conversation layout. Run from any directory; see finetune_demo/finetune_cogagent_lora.sh and
`python finetune_demo/finetune_cogagent_demo.py --help`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from any directory

from models.tp import exit_process  # noqa: E402
from utils.training.finetune import main  # noqa: E402

if __name__ == "__main__":
    exit_process(main(default_model="cogagent-chat", description=__doc__))
