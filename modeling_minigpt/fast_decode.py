"""An opt-in decode loop for MiniGPT whose every step is one compiled function replayed as one CUDA graph.

`model.generate()` runs the decode step through Python each time: prepare the inputs, call the model (compiled
when the cache is static), process the logits, pick the token, check the stopping criteria, concatenate. At
batch 1 that host work, not the GPU, sets the speed. `FastDecoder` keeps everything on the device instead:

    prefill (eager, once per call)  ->  step: [write mask slot -> model forward on the static KV cache ->
    last-position logits -> argmax (or a Gumbel-max sample) -> EOS bookkeeping -> write the token]
                                        compiled with torch.compile(fullgraph=True), captured once as a CUDA graph

so a step costs one graph replay and no host-device synchronisation. Greedy decoding gives exactly the tokens of
`generate(do_sample=False)`. On a CPU (or with `cuda_graphs=False`) the same step runs without the graph, eagerly
by default or compiled with `compile=True`.

    >>> from modeling_minigpt.fast_decode import FastDecoder
    >>> decoder = FastDecoder(model, batch_size=1, max_length=384)   # shapes are fixed per decoder
    >>> ids = decoder.generate(input_ids, max_new_tokens=256)          # reuse it: capture happens once

The file imports only torch, transformers and nothing from its siblings at run time, and `modeling_minigpt.py`
does not import it, so checkpoints loaded with `trust_remote_code=True` are unaffected by it.

Shape legend: B batch, P prompt length, S max_length (cache slots), V vocabulary.
"""

import torch
from transformers.cache_utils import StaticCache


class FastDecoder:
    """Greedy or sampled decoding for a MiniGPTForCausalLM with a fixed batch size and cache length.

    Args:
        model: a `MiniGPTForCausalLM` (or any causal LM whose forward takes a 4-D boolean attention mask, explicit
            position ids and a transformers `StaticCache`), already on its device and in its dtype.
        batch_size: rows per call; every call must use exactly this many.
        max_length: cache slots, i.e. the longest prompt + new tokens a call may ask for.
        compile: wrap the step in `torch.compile(fullgraph=True)`. Default: on CUDA only (compiling on a CPU
            takes longer than it saves for short runs).
        cuda_graphs: capture the compiled step as a CUDA graph after `warmup_steps` real steps and replay it.
            Default: on CUDA. Needs a CUDA model.
        warmup_steps: decode steps run through the compiled function before the capture (compilation, autotuning
            and lazy CUDA initialisation happen there); they produce real tokens.
        check_every: with an EOS token, look every this many steps whether all rows have finished (a host sync).
    """

    def __init__(
        self,
        model,
        batch_size: int,
        max_length: int,
        *,
        compile: bool | None = None,
        cuda_graphs: bool | None = None,
        warmup_steps: int = 3,
        check_every: int = 16,
    ):
        device = model.device
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda"
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a model on a CUDA device, but it is on {device}; move it with "
                             "model.to('cuda') or pass cuda_graphs=False.")
        limit = getattr(model.config, "n_positions", None)
        learned = getattr(model.config, "position_embedding_type", "learned") == "learned"
        if learned and limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds the model's learned positions (n_positions={limit}); "
                             f"lower it to at most {limit}.")
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"FastDecoder needs batch_size >= 1 and max_length >= 2, got {batch_size}, {max_length}.")
        self.model = model
        self.batch_size, self.max_length = batch_size, max_length
        self.cuda_graphs = cuda_graphs
        self.warmup_steps, self.check_every = max(1, warmup_steps), max(1, check_every)
        self.cache = StaticCache(config=model.config, max_cache_len=max_length)

        # Device state the step reads and updates in place: the captured graph sees fixed addresses.
        B, S = batch_size, max_length
        long = dict(dtype=torch.long, device=device)
        self.sequence = torch.zeros(B, S, **long)  # prompt, then the generated tokens
        self.key_mask = torch.zeros(B, S, dtype=torch.bool, device=device)  # cache slots a query may attend to
        self.index = torch.zeros((), **long)  # cache slot of the token being fed
        self.position = torch.zeros(B, 1, **long)  # its position id (real tokens before it)
        self.unfinished = torch.ones(B, dtype=torch.bool, device=device)
        self.eos = torch.full((1,), -1, **long)  # -1: no EOS
        self.pad = torch.zeros((), **long)
        self.inv_temperature = torch.ones((), dtype=torch.float32, device=device)
        self.do_sample = False
        self.top_k = 0

        if compile is None:
            compile = device.type == "cuda"
        self._step_fn = torch.compile(self._step, fullgraph=True, dynamic=False) if compile else self._step
        self._graph = None  # the captured step, once warmup_steps compiled steps have run
        self._warm = 0

    @torch.no_grad()
    def _step(self):
        """One decode step, all on the device: feed sequence[:, index], write the next token to index + 1."""
        self.key_mask.index_fill_(1, self.index.view(1), True)  # the fed token may attend to itself
        tokens = self.sequence.index_select(1, self.index.view(1))  # (B, 1)
        out = self.model(
            input_ids=tokens,
            attention_mask=self.key_mask[:, None, None, :],  # (B, 1, 1, S): a ready 4-D mask, used as it is
            position_ids=self.position,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        next_tokens = self._select(out.logits[:, -1])  # (B,)
        # rows that have finished emit padding, as generate() does
        next_tokens = torch.where(self.unfinished, next_tokens, self.pad)
        self.unfinished &= ~torch.isin(next_tokens, self.eos)
        self.sequence.index_copy_(1, self.index.view(1) + 1, next_tokens[:, None])
        self.position += 1
        self.index += 1

    def _select(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of each row from its last logits (B, V): argmax, or a sample drawn with the Gumbel-max
        trick (argmax of logits / T + Gumbel noise is a draw from softmax(logits / T)), which unlike
        torch.multinomial needs no host sync and can be captured in a CUDA graph."""
        logits = logits.float()
        if not self.do_sample:
            return logits.argmax(-1)
        logits = logits * self.inv_temperature
        if self.top_k:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        gumbel = -torch.empty_like(logits).exponential_().log()
        return (logits + gumbel).argmax(-1)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
    ) -> torch.LongTensor:
        """Prompt (B, P) -> prompt plus up to max_new_tokens new tokens, (B, P + n), like `model.generate`.

        `attention_mask` marks left padding (1 = real token), as for generate(). `eos_token_id` and
        `pad_token_id` default to the model's generation_config, as in generate(); rows that produced an EOS get
        `pad_token_id` afterwards, and the run stops when every row has finished. Sampling uses torch's global
        RNG: seed it with torch.manual_seed for reproducible draws."""
        B, P = input_ids.shape
        if B != self.batch_size:
            raise ValueError(f"This FastDecoder was built for batch_size={self.batch_size}, got {B} rows; build "
                             "another FastDecoder for this batch size.")
        if max_new_tokens < 1 or P + max_new_tokens > self.max_length:
            raise ValueError(f"A prompt of {P} tokens plus max_new_tokens={max_new_tokens} must fit in max_length="
                             f"{self.max_length} (and max_new_tokens >= 1); build the decoder with a larger "
                             "max_length or ask for fewer tokens.")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}.")
        vocab = self.model.config.vocab_size
        if not 0 <= top_k <= vocab:
            raise ValueError(f"top_k must lie in [0, {vocab}] (0 = no top-k filter), got {top_k}.")
        if (do_sample, top_k) != (self.do_sample, self.top_k):  # they shape the traced step: capture it anew
            self.do_sample, self.top_k = do_sample, top_k
            self._invalidate()
        defaults = self.model.generation_config
        self._set_eos(defaults.eos_token_id if eos_token_id is None else eos_token_id,
                      defaults.pad_token_id if pad_token_id is None else pad_token_id)
        self.inv_temperature.fill_(1.0 / temperature)
        device = self.sequence.device
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)

        # prefill: the prompt through the model, eagerly; positions count real tokens, as in generate()
        self.cache.reset()
        self.sequence.zero_()
        self.sequence[:, :P] = input_ids
        self.key_mask.zero_()
        self.key_mask[:, :P] = mask.bool()
        self.unfinished.fill_(True)
        prompt_positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=prompt_positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        first = self._select(out.logits[:, -1])  # (B,)
        self.unfinished &= ~torch.isin(first, self.eos)
        self.sequence[:, P] = first
        self.index.fill_(P)
        self.position.copy_(mask.long().sum(-1, keepdim=True))  # (B, 1)

        has_eos = bool((self.eos >= 0).any())
        for step in range(max_new_tokens - 1):
            if has_eos and step % self.check_every == 0 and not bool(self.unfinished.any()):
                break
            self._run_step()
        return self._trim(P, max_new_tokens, has_eos)

    def _run_step(self):
        if self._graph is not None:
            self._graph.replay()
            return
        if not self.cuda_graphs:
            self._step_fn()
            return
        # CUDA: the first steps run the compiled function on a side stream (compilation, autotuning and cuBLAS
        # workspaces happen outside the capture), then the next step is captured and every later one replayed
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step_fn()
        torch.cuda.current_stream().wait_stream(stream)
        self._warm += 1
        if self._warm >= self.warmup_steps:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records, does not run: the state stays where it is
                self._step_fn()
            self._graph = graph
            self._graph.replay()

    def _invalidate(self):
        """Forget the captured graph (torch.compile re-traces by itself: it guards on what the step reads)."""
        self._graph = None
        self._warm = 0

    def _set_eos(self, eos_token_id, pad_token_id):
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if eos and pad_token_id is None:
            pad_token_id = eos[0]  # what generate() does when no pad token is set
        if len(eos) > self.eos.numel():  # a different size changes the traced program
            self.eos = torch.empty(len(eos), dtype=torch.long, device=self.eos.device)
            self._invalidate()
        self.eos.fill_(-1)
        if eos:
            self.eos[: len(eos)] = torch.tensor(eos, dtype=torch.long)
        self.pad.fill_(pad_token_id if pad_token_id is not None else 0)

    def _trim(self, P: int, max_new_tokens: int, has_eos: bool) -> torch.LongTensor:
        """Cut the output where generate() stops: after max_new_tokens, or once every row has emitted an EOS."""
        new = self.sequence[:, P : P + max_new_tokens]  # (B, n)
        length = max_new_tokens
        if has_eos:
            is_eos = torch.isin(new, self.eos[self.eos >= 0])  # (B, n)
            finished = is_eos.cumsum(-1).clamp(max=1).bool()  # (B, n): True from a row's first EOS on
            all_done = finished.all(0).nonzero()
            if all_done.numel():
                length = int(all_done[0]) + 1
        return self.sequence[:, : P + length].clone()


def fast_generate(model, input_ids: torch.LongTensor, max_new_tokens: int, **kwargs) -> torch.LongTensor:
    """One-off convenience: build a `FastDecoder` sized for this call and run it. The decoder compiles and
    captures on first use, so build one `FastDecoder` and reuse it when decoding many batches of the same shape.
    Takes `generate`'s arguments: attention_mask, eos_token_id, pad_token_id, do_sample, temperature, top_k,
    plus the decoder's own: compile, cuda_graphs."""
    build = {k: kwargs.pop(k) for k in ("compile", "cuda_graphs", "warmup_steps", "check_every") if k in kwargs}
    decoder = FastDecoder(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens, **build)
    return decoder.generate(input_ids, max_new_tokens, **kwargs)


__all__ = ["FastDecoder", "fast_generate"]
