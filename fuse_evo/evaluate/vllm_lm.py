"""The vLLM backend (``evaluator.backend=vllm``), the only module that imports vllm.

One ``VLLMEngine`` per worker, started once from the base model's folder; each candidate's
merged weights are written into it in place through vLLM's public worker RPC
(``collective_rpc("reload_weights", weights_iterator=...)``: checkpoint-format names, so
vLLM's own ``load_weights`` packs qkv and gate_up and repacks for its CPU kernels), and the
prefix cache is reset, since KV blocks computed with the old weights are stale. No disk, no
restart per candidate.

``VLLMLM`` answers lm-eval's requests with that engine: loglikelihood (and multiple choice,
rolling loglikelihood) from prompt logprobs, generation with the task's own stop sequences.
Prompts are tokenized by HFLM's own methods, so both backends score the same token ids; the
evaluator then applies lm-eval's per-document scoring and aggregation to the answers, as for
the hf backend.

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set unless the
user set it): the weights reach it as tensors, not serialized, and no spawned process needs
the caller's ``__main__`` guard.
"""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..config import VLLM_INSTALL
from ..errors import FuseEvoError
from .evaluator import NonFiniteOutputs, PlanCache


def _import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # vLLM's CPU worker drops torch to one thread for serving unless OMP_NUM_THREADS says more
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    try:
        import vllm
        from vllm.inputs import TokensPrompt
    except ImportError as e:  # torchvision & co. built for another torch: their native code fails
        raise FuseEvoError(f"vllm cannot be imported: {type(e).__name__}: {e} ({VLLM_INSTALL})") from None
    return vllm, TokensPrompt


class VLLMEngine:
    """A vLLM engine on one model folder, built once per worker; candidates' weights are
    written into it in place.

    ``folder``: a Hugging Face model folder (the base: the engine starts with its weights).
    ``dtype``: the live model's precision (None: the checkpoint's). ``max_model_len``: the
    longest prompt + generation (None: the model's own). ``kv_cache_gb``: the KV cache's size
    (None: on a GPU, what ``gpu_memory_utilization`` leaves; on a CPU, 2 GiB).
    """

    def __init__(self, folder: str | Path, *, dtype: str | None = None, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, kv_cache_gb: float | None = None,
                 enforce_eager: bool = True, seed: int = 0, device: str | None = None):
        vllm, self._TokensPrompt = _import_vllm()
        self.folder = Path(folder)
        cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        if kv_cache_gb is None and not cuda:
            kv_cache_gb = 2.0
        kwargs: dict[str, Any] = {}
        if kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        t0 = time.perf_counter()
        try:
            self.llm = vllm.LLM(
                model=str(self.folder), tokenizer=str(self.folder), dtype=dtype or "auto", seed=seed,
                enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization,
                enable_prefix_caching=True, **kwargs,
            )
        except Exception as e:
            detail = " ".join(str(e).split())[:400]
            raise FuseEvoError(f"vLLM cannot start on {self.folder}: {type(e).__name__}: {detail}") from None
        self.start_seconds = time.perf_counter() - t0
        config = self.llm.llm_engine.model_config
        self.max_model_len = int(config.max_model_len)
        self.dtype = config.dtype
        self.device = torch.device("cuda" if cuda else "cpu")
        self.config = config.hf_config
        self.num_parameters = _parameters(self.folder)
        self.weight_seconds = 0.0  # the latest write_weights

    @classmethod
    def from_config(cls, folder: str | Path, cfg, dtype: str | None = None, device: str | None = None) -> "VLLMEngine":
        """From an ``evaluator.vllm`` config (``fuse_evo.config.VLLMConfig``)."""
        return cls(folder, dtype=dtype, max_model_len=cfg.max_model_len, kv_cache_gb=cfg.kv_cache_gb,
                   gpu_memory_utilization=cfg.gpu_memory_utilization or 0.9, enforce_eager=cfg.enforce_eager,
                   seed=cfg.seed, device=device)

    def write_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Write ``(checkpoint name, tensor)`` pairs into the running model, in place; returns
        the seconds it took. Tensors missing from ``tensors`` keep their values."""
        t0 = time.perf_counter()
        weights = ((name, tensor.detach()) for name, tensor in tensors)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()  # cached KV blocks hold the previous weights' keys and values
        self.weight_seconds = time.perf_counter() - t0
        return self.weight_seconds

    def write_model(self, model: torch.nn.Module) -> float:
        """``write_weights`` of a live Hugging Face model's whole state (its checkpoint names)."""
        return self.write_weights(model.state_dict().items())

    def prompts(self, token_ids: Sequence[Sequence[int]]) -> list:
        return [self._TokensPrompt(prompt_token_ids=list(ids)) for ids in token_ids]

    def run(self, token_ids: Sequence[Sequence[int]], params: Sequence[Any]) -> list:
        """One ``generate`` call over all prompts (vLLM schedules its own batches)."""
        return self.llm.generate(self.prompts(token_ids), list(params), use_tqdm=False)

    def sampling_params(self, **kwargs):
        from vllm import SamplingParams

        return SamplingParams(**kwargs)

    def lm_eval_model(self, tokenizer, batch_size: int) -> "VLLMLM":
        """The lm-eval model the Evaluator calls (``Evaluator(engine, tokenizer, tasks)``)."""
        return VLLMLM(self, tokenizer, batch_size)

    def close(self) -> None:
        """Shut the engine down and free its KV cache and weights. vLLM's parallel state is
        process-global: one engine at a time per process, the next one started after close."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            llm.llm_engine.engine_core.shutdown()
            del llm
            cleanup_dist_env_and_memory()


def _parameters(folder: Path) -> int | None:
    """The checkpoint's parameter count, from its safetensors headers (no tensor data)."""
    import math

    from ..models import SAFETENSORS, SAFETENSORS_INDEX, read_header

    files = sorted(folder.glob("*.safetensors")) if (folder / SAFETENSORS_INDEX).exists() else [folder / SAFETENSORS]
    try:
        return sum(math.prod(info["shape"]) for f in files for k, info in read_header(f)[0].items()
                   if k != "__metadata__")
    except (OSError, ValueError):
        return None


class VLLMLM(PlanCache, TemplateLM):
    """lm-eval's model interface on a ``VLLMEngine``; tokenization is HFLM's own (its methods,
    bound to this object), so a request becomes the same token ids under both backends."""

    backend = "causal"
    tok_encode = HFLM.tok_encode
    tok_batch_encode = HFLM.tok_batch_encode
    tok_decode = HFLM.tok_decode
    prefix_token_id = HFLM.prefix_token_id

    def __init__(self, engine: VLLMEngine, tokenizer, batch_size: int = 64):
        super().__init__()
        self.engine = engine
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # unused: vLLM schedules its own batches
        self.add_bos_token = None
        self.custom_prefix_token_id = None
        self.truncation = False
        self.tokens = 0  # prompt and generated tokens since the last reset
        self._plans: dict[tuple, tuple[list, Any]] = {}
        self._last: dict[str, list[list[int]]] = {}  # request type -> its prompts (+ generations)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.engine.max_model_len

    @property
    def max_gen_toks(self) -> int:
        return 256

    def prepare(self, reqtype: str, requests: list) -> None:
        if reqtype == "loglikelihood":
            self._plan(reqtype, requests, self._build_ll)
        elif reqtype == "generate_until":
            self._plan(reqtype, requests, self._build_gen)

    def token_sequences(self) -> list[list[int]]:
        """Every prompt of the latest call with what was generated for it."""
        return [list(s) for seqs in self._last.values() for s in seqs]

    # ---------------------------------------------------------------- loglikelihood
    def _build_ll(self, requests) -> list[tuple[list[int], int]]:
        """(prompt ids, continuation length) per request: TemplateLM's encoding, the left
        truncation HFLM applies (its input is context + continuation[:-1]; vLLM's prompt is
        one token longer and must leave room for one generated token)."""
        out = []
        for req in requests:
            context, continuation = req.args
            if context == "":
                cont = self.tok_encode(continuation, add_special_tokens=False)
                ctx, cont = ([self.prefix_token_id], cont) if self.prefix_token_id != cont[0] else (cont[:1], cont[1:])
            else:
                ctx, cont = self._encode_pair(context, continuation)
            out.append(self._ll_prompt(ctx, cont, req.args))
        return out

    def _ll_prompt(self, ctx: list[int], cont: list[int], what: Any) -> tuple[list[int], int]:
        limit = self.max_length - 1  # vLLM's prompt leaves room for one generated token
        if not ctx or not cont or len(cont) > limit:
            raise FuseEvoError(f"request {what!r}: empty or over-long encoding")
        return (ctx + cont)[-limit:], len(cont)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._score_prompts(self._plan("loglikelihood", requests, self._build_ll))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return self._score_prompts([self._ll_prompt(ctx, cont, key) for key, ctx, cont in requests])

    def _score_prompts(self, plan: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        if not plan:
            return []
        params = self.engine.sampling_params(max_tokens=1, prompt_logprobs=1, detokenize=False, temperature=0.0)
        outputs = self.engine.run([ids for ids, _ in plan], [params] * len(plan))
        results, bad = [], 0
        for (ids, n), out in zip(plan, outputs, strict=True):
            total, greedy = 0.0, True
            for tok, at in zip(ids[-n:], out.prompt_logprobs[-n:], strict=True):
                lp = at[tok]
                total += lp.logprob
                greedy = greedy and lp.rank == 1
            bad += not (total == total and abs(total) != float("inf"))
            results.append((total, greedy))
            self.tokens += len(ids)
        if bad:
            raise NonFiniteOutputs(f"the model's log-likelihoods are not finite (inf or nan) for {bad} of "
                                   f"{len(plan)} requests: its weights or activations overflow")
        self._last["loglikelihood"] = [ids for ids, _ in plan]
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """HFLM's rolling windows (disjoint, context length 1), each scored by prompt logprobs."""
        out = []
        for req in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 1, context_len=1)]
            scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            out.append(sum(lp for lp, _ in scored))
        return out

    # ---------------------------------------------------------------- generation
    def _build_gen(self, requests) -> list[tuple[list[int], Any, list[str]]]:
        """(prompt ids, sampling parameters, stop strings) per request: HFLM's encoding and
        left truncation, lm-eval's normalization of the task's generation kwargs; a sampled
        request gets a seed of its own (its text and index), so a candidate's score does not
        depend on the order vLLM runs them in."""
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        plan = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            max_ctx_len = self.max_length - max_gen_toks
            if max_ctx_len <= 0:
                raise FuseEvoError(f"generation request of {max_gen_toks} tokens does not fit "
                                   f"evaluator.vllm.max_model_len={self.max_length}")
            ids, mask = self.tok_batch_encode([context], left_truncate_len=max_ctx_len, truncation=self.truncation)
            sample: dict[str, Any] = {"temperature": 0.0}
            if do_sample and temperature > 0:
                sample = {"temperature": temperature, "seed": zlib.crc32(f"{i}\0{context}".encode())}
                for key in ("top_p", "top_k", "min_p", "repetition_penalty"):
                    if key in kwargs:
                        sample[key] = kwargs.pop(key)
            params = self.engine.sampling_params(max_tokens=max_gen_toks, stop=list(until), skip_special_tokens=False,
                                                 spaces_between_special_tokens=False, **sample)
            plan.append((ids[0][mask[0].bool()].tolist(), params, until))
        return plan

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        plan = self._plan("generate_until", requests, self._build_gen)
        if not plan:
            return []
        outputs = self.engine.run([ids for ids, _, _ in plan], [p for _, p, _ in plan])
        texts, last = [], []
        for (ids, _, until), out in zip(plan, outputs, strict=True):
            toks = list(out.outputs[0].token_ids)
            texts.append(postprocess_generated_text(self.tok_decode(toks), stop=until, think_end_token=None))
            self.tokens += len(ids) + len(toks)
            last.append(ids + toks)
        self._last["generate_until"] = last
        return texts
