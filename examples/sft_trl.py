"""Supervised fine-tuning of a MiniGPT checkpoint with TRL's SFTTrainer, on CPU.

    pip install trl==1.16.0          # next to this package: pip install -e .
    python examples/sft_trl.py --model runs/tiny --output_dir runs/tiny-sft --max_steps 30

SFTTrainer (TRL 1.16) turns bf16 on by default, which stops on a machine without a GPU; `use_cpu=True` (below)
trains in fp32 on the CPU instead. The data are minigpt/train/examples/qa.jsonl as prompt/completion pairs, so the
loss covers the answers only (`completion_only_loss`, TRL's default for that format).
"""

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

QA = Path(__file__).resolve().parents[1] / "minigpt" / "train" / "examples" / "qa.jsonl"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a MiniGPT folder (save_pretrained output, with its tokenizer)")
    parser.add_argument("--output_dir", required=True, help="where the fine-tuned model is written")
    parser.add_argument("--max_steps", type=int, default=30, help="optimizer steps (default: 30)")
    parser.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=not torch.cuda.is_available(),
                        help="train on the CPU in fp32 (default: when no GPU is found)")  # fmt: skip
    args = parser.parse_args()

    rows = [json.loads(line) for line in QA.read_text().splitlines() if line.strip()]
    data = Dataset.from_list([{"prompt": f"Q: {r['question']}\nA:", "completion": f" {r['answer']}"} for r in rows])

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)  # the folder has an auto_map
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True)
    config = SFTConfig(
        output_dir=args.output_dir,
        use_cpu=args.cpu,  # without it SFTTrainer asks for bf16, which needs a GPU
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        max_length=64,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    result = trainer.train()
    print(f"train_loss {result.training_loss:.4f} after {result.global_step} steps")
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
