"""The Trainer callbacks and loss of fine-tuning (minigpt/train/finetune.py): stop on a signal with a checkpoint, keep
every checkpoint-N ready for inference and self-describing, and label smoothing with the causal shift."""

from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_pt_utils import LabelSmoother

from minigpt.folders import enable_cache
from minigpt.train.faults import StopOnSignal
from minigpt.train.pairs import PromptTemplate


class SaveTemplateCallback(TrainerCallback):
    """Copies the prompt template into every checkpoint-N folder, so that each one evaluates on its own."""

    def __init__(self, template: PromptTemplate):
        self.template = template

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            self.template.save(folder)


class StopOnSignalCallback(TrainerCallback):
    """SIGTERM or Ctrl-C finishes the current optimizer step, saves a checkpoint-N and stops, as pretraining does
    (the same handler, minigpt/train/faults.py), so an interrupted fine-tune loses nothing; a second Ctrl-C interrupts
    at once. `with callback.stop.installed():` while training."""

    def __init__(self):
        self.stop = StopOnSignal()

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.signal is not None:  # after DefaultFlowCallback, so whatever --save_strategy says, this step saves
            control.should_save = control.should_training_stop = True


class KeepUseCacheCallback(TrainerCallback):
    """Writes `use_cache: true` back into every checkpoint-N's config.json and generation_config.json
    (minigpt.folders.enable_cache says why). The files are edited rather than the live config, so training itself is
    left as Trainer set it up."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            enable_cache(folder)


def causal_label_smoothing(factor: float):
    """Trainer's label-smoothed loss with the labels shifted, as a causal LM needs, or None without smoothing.

    Trainer shifts them only for models whose class name is in transformers' built-in causal-LM table; any other
    model (a remote-code one, say) would be smoothed against its unshifted labels, each position scored on its own
    input token, which teaches it to copy. MiniGPT adds itself to that table, but a fine-tune may start from any
    causal LM folder, so the shift is asked for here whatever the model."""
    if not factor:
        return None
    smoother = LabelSmoother(epsilon=factor)
    return lambda outputs, labels, num_items_in_batch=None: smoother(
        outputs, labels, shift_labels=True, num_items_in_batch=num_items_in_batch
    )
