"""Conversational fine-tuning of a MiniGPT chat model with TRL's SFTTrainer, the loss on the assistant's turns only.

    pip install trl==1.16.0          # next to this package: pip install -e .
    python examples/sft_chat_trl.py --model runs/chat --data chat.jsonl --output_dir runs/chat-trl --max_steps 30

The data are TRL's conversational format, one {"messages": [{"role", "content"}, ...]} record per line; the model
folder needs a chat template whose assistant turns sit in {% generation %} blocks, as every `minigpt-finetune --mode
chat` output has (minigpt/train/chat.py). `assistant_only_loss=True` then masks everything but the assistant's
tokens, the same tokens minigpt-finetune trains on. `use_cpu=True` where there is no GPU: SFTTrainer asks for bf16.
"""

import argparse

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer


def trainer_for(model_dir: str, data: str, output_dir: str, max_steps: int, cpu: bool) -> SFTTrainer:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)  # the folder has an auto_map
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    config = SFTConfig(
        output_dir=output_dir,
        use_cpu=cpu,  # without it SFTTrainer asks for bf16, which needs a GPU
        assistant_only_loss=True,
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        max_length=128,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
    )
    dataset = load_dataset("json", data_files=data, split="train")
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a MiniGPT chat model folder (minigpt-finetune --mode chat)")
    parser.add_argument("--data", required=True, help="a .jsonl of {'messages': [...]} records")
    parser.add_argument("--output_dir", required=True, help="where the fine-tuned model is written")
    parser.add_argument("--max_steps", type=int, default=30, help="optimizer steps (default: 30)")
    parser.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=not torch.cuda.is_available(),
                        help="train on the CPU in fp32 (default: when no GPU is found)")  # fmt: skip
    args = parser.parse_args()
    trainer = trainer_for(args.model, args.data, args.output_dir, args.max_steps, args.cpu)
    result = trainer.train()
    print(f"train_loss {result.training_loss:.4f} after {result.global_step} steps")
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
