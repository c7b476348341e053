"""MergeEngine on the micro zoo: equals the operators, in place, deterministic, checked first."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fuse_evo.merge.save import save_live_model, save_merged
from fuse_evo.errors import FuseEvoError
from fuse_evo.merge import methods as ops
from fuse_evo.merge.engine import MergeEngine, tensor_seed
from fuse_evo.models import ModelPool
from fuse_evo.recipe import Recipe, RecipeError
from fuse_evo.zoo.scoring import greedy_exact_match
from fuse_evo.zoo.skills import eval_splits

SKILLS = ("increment", "reverse", "shift")


@pytest.fixture(scope="module")
def engine(micro_zoo):
    models = micro_zoo["models"]
    pool = ModelPool(models["base"]["path"], {n: m["path"] for n, m in models.items() if m["skill"]})
    return MergeEngine(pool, device="cpu")


def _recipe(method, **params):
    per_model = {"weight": 0.6, "density": 0.5}
    if method in ("task_arithmetic", "linear"):
        per_model = {"weight": 0.6}
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        per_model["gamma"] = 0.05
    if method in ("della", "della_linear"):
        per_model["epsilon"] = 0.1
    if method in ("slerp", "model_stock"):
        per_model = {}
    models = ("ft_reverse",) if method == "slerp" else ("ft_increment", "ft_reverse", "ft_shift")
    groups = {"*": {"*": per_model}} if per_model else {}
    if per_model:  # a per-layer, per-part override, as a search would write
        groups["layers.1.mlp"] = {"ft_shift": {**per_model, "weight": 0.9}}
    return Recipe(method=method, models=models, parameters=params, groups=groups, seed=3)


def _reference(engine, recipe, name):
    """The operator called directly on the pool's full tensors with the recipe's parameters."""
    pool = engine.pool
    base = pool.base.tensors[name]
    srcs = [pool.sources[m].tensors[name] for m in recipe.models]
    group = pool.groups[name]
    per = [recipe.model_params(group, m) for m in recipe.models]
    w = [p.get("weight") for p in per]
    d = [p.get("density") for p in per]
    seed = tensor_seed(recipe.seed, name)
    m = recipe.method
    kw = {("lambda_" if k == "lambda" else k): v for k, v in recipe.parameters.items()}
    if m == "linear":
        return ops.linear(srcs, w)
    if m == "task_arithmetic":
        return ops.task_arithmetic(base, srcs, w)
    if m == "ties":
        return ops.ties(base, srcs, w, d, **kw)
    if m in ("breadcrumbs", "breadcrumbs_ties"):
        return getattr(ops, m)(base, srcs, w, d, [p["gamma"] for p in per], **kw)
    if m in ("dare_ties", "dare_linear"):
        return getattr(ops, m)(base, srcs, w, d, seed=seed, **kw)
    if m in ("della", "della_linear"):
        return getattr(ops, m)(base, srcs, w, d, [p["epsilon"] for p in per], seed=seed, **kw)
    if m == "slerp":
        return ops.slerp([base, srcs[0]], recipe.parameters["t"])
    return ops.model_stock(base, srcs)


@pytest.mark.parametrize(
    "method, params",
    [
        ("linear", {}), ("task_arithmetic", {}), ("ties", {}), ("breadcrumbs", {}),
        ("breadcrumbs_ties", {}), ("dare_ties", {}), ("dare_linear", {}), ("della", {}),
        ("della_linear", {}), ("slerp", {"t": 0.3}), ("model_stock", {}),
        # every option the fused kernel branches on, against the eager operators
        ("ties", {"rescale": True, "lambda": 0.8}), ("ties", {"consensus": "count", "normalize": False}),
        ("breadcrumbs", {"rescale": "l2", "normalize": True}), ("breadcrumbs_ties", {"rescale": "keep_prob"}),
        ("dare_ties", {"rescale": "linf", "consensus": "count"}), ("dare_linear", {"rescale": False}),
        ("della", {"rescale": "keep_prob", "normalize": False}), ("della_linear", {"normalize": True}),
    ],
)
def test_engine_equals_the_operators(engine, method, params):
    recipe = _recipe(method, **params)
    live = engine.pool.new_model()
    engine.materialize(recipe, into=live)
    merged = live.state_dict()
    for name in engine.pool.tensor_names:
        torch.testing.assert_close(merged[name], _reference(engine, recipe, name), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{method} {name}: {m}")


def test_materialize_is_in_place_and_repeatable(engine):
    live = engine.pool.new_model()
    params = {n: p for n, p in live.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in params.items()}
    a, b = _recipe("dare_ties"), Recipe.from_dict({**_recipe("dare_ties").to_dict(), "seed": 4})
    engine.materialize(a, into=live)
    first = {n: p.detach().clone() for n, p in params.items()}
    engine.materialize(b, into=live)
    assert any(not torch.equal(first[n], p) for n, p in params.items())
    engine.materialize(a, into=live)
    assert all(torch.equal(first[n], p) for n, p in params.items())
    assert {n: p.data_ptr() for n, p in live.named_parameters()} == ptrs


def test_uniform_task_arithmetic_reproduces_the_zoo_merge(engine, micro_zoo):
    """The engine's task arithmetic scores exactly what the zoo measured for the same merge."""
    ta = micro_zoo["uniform_merges"]["task_arithmetic"]
    scale = ta["best_scale"]
    recipe = Recipe("task_arithmetic", ("ft_increment", "ft_reverse", "ft_shift"),
                    parameters={"lambda": scale}, groups={"*": {"*": {"weight": 1.0}}})
    live = engine.materialize(recipe, into=engine.pool.new_model())
    tok = engine.pool.tokenizer()
    cfg = micro_zoo["config"]
    for skill in SKILLS:
        heldout = eval_splits(skill, cfg["seed"], cfg["n_search"], cfg["n_heldout"])[1]
        assert round(greedy_exact_match(live, tok, heldout), 4) == ta["best"]["scores"][skill]


@pytest.mark.parametrize(
    "recipe, message",
    [
        (Recipe("ties", ("ft_x",), groups={"*": {"*": {"weight": 1.0}}}), r"recipe.models: \['ft_x'\] not in the pool"),
        (Recipe("ties", ("ft_shift",), parameters={"t": 0.5}, groups={"*": {"*": {"weight": 1.0}}}), r"\['t'\] do not apply to ties"),
        (Recipe("ties", ("ft_shift",), groups={"layers.0": {"*": {"weight": 1.0}}}), "no weight for model 'ft_shift' in group head"),
        (Recipe("task_arithmetic", ("ft_shift",), groups={"*": {"*": {"weight": 1.0, "density": 0.5}}}), r"\['density'\] do not apply to task_arithmetic"),
        (Recipe("slerp", ("ft_shift", "ft_reverse")), "exactly one model"),
        (Recipe("slerp", ("ft_shift",)), "slerp needs t"),
        (Recipe("model_stock", ("ft_shift",)), "at least two"),
        # values a kernel would only reject halfway through the model: caught up front
        (Recipe("ties", ("ft_shift",), groups={"*": {"*": {"weight": 1.0}}, "layers.1.mlp": {"*": {"weight": 1.0, "density": 1.5}}}),
         r"density must be in \(0, 1\], got 1.5 \(model 'ft_shift', group layers.1.mlp\)"),
        (Recipe("breadcrumbs", ("ft_shift",), groups={"*": {"*": {"weight": 1.0, "density": 0.5, "gamma": -0.1}}}), "gamma must be in"),
        (Recipe("della", ("ft_shift",), groups={"*": {"*": {"weight": 1.0, "density": 0.9, "epsilon": 0.2}}}), "epsilon"),
        (Recipe("dare_ties", ("ft_shift",), parameters={"rescale": "l3"}, groups={"*": {"*": {"weight": 1.0}}}), "rescale: 'l3'"),
        (Recipe("ties", ("ft_shift",), parameters={"consensus": "vote"}, groups={"*": {"*": {"weight": 1.0}}}), "consensus: 'vote'"),
        (Recipe("dare_linear", ("ft_shift", "ft_reverse"), parameters={"normalize": True},
                groups={"*": {"ft_shift": {"weight": 1.0}, "ft_reverse": {"weight": -1.0}}}), "weights sum to zero in group"),
    ],
)
def test_bad_recipes_fail_before_the_model_is_touched(engine, recipe, message):
    live = engine.pool.new_model()
    before = {k: v.clone() for k, v in live.state_dict().items()}
    with pytest.raises(RecipeError, match=message):
        engine.materialize(recipe, into=live)
    assert all(torch.equal(before[k], v) for k, v in live.state_dict().items())


@pytest.mark.parametrize("writer", ["save_merged", "save_live_model"])
def test_export_writes_a_loadable_folder_atomically(engine, tmp_path, writer):
    """Both writers of a scored model (transformers' save_pretrained, and the shard-by-shard
    one export uses): a sharded folder that loads and computes what the live model does."""
    recipe = _recipe("ties")
    live = engine.materialize(recipe, into=engine.pool.new_model())
    sources = {"base": str(engine.pool.base.path), **{n: str(m.path) for n, m in engine.pool.sources.items()}}
    write = save_merged if writer == "save_merged" else (
        lambda model, *args, **kw: save_live_model(model, engine.pool, *args, **kw))
    out = write(live, engine.pool.tokenizer(), tmp_path / "merged", recipe, sources,
                scores={"zoo_shift_heldout/acc": 0.5}, max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").exists()  # sharded
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp folder left behind
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 34, 21, 38, 4, 17, 18, 19, 4, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, live(ids).logits)
    card = (out / "README.md").read_text()
    assert recipe.key in card and "zoo_shift_heldout/acc" in card
    import yaml
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert Recipe.from_dict(saved["recipe"]) == recipe and saved["sources"] == sources
    with pytest.raises(FuseEvoError, match="already exists"):
        write(live, None, out, recipe, sources)


# ----------------------------------------------------------------------------- own dtype, no copies


def _retyped_zoo(micro_zoo, tmp_path, dtypes: dict[str, torch.dtype]) -> ModelPool:
    """The micro zoo's base and experts saved again in other dtypes (e.g. bf16 base, fp16 expert)."""
    import shutil

    from safetensors.torch import load_file, save_file

    models = micro_zoo["models"]
    paths = {}
    for name, m in models.items():
        out = tmp_path / name
        shutil.copytree(m["path"], out)
        tensors = load_file(out / "model.safetensors")
        dtype = dtypes.get(name, dtypes.get("*"))
        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, out / "model.safetensors")
        paths[name] = out
    return ModelPool(paths["base"], {n: paths[n] for n, m in models.items() if m["skill"]})


def test_the_engine_keeps_the_pools_tensors_in_their_own_dtype_without_copies(engine, micro_zoo, tmp_path):
    pool = _retyped_zoo(micro_zoo, tmp_path, {"*": torch.bfloat16, "ft_shift": torch.float16})
    bf16 = MergeEngine(pool, device="cpu")
    for name, t in pool.base.tensors.items():
        assert bf16.base[name].data_ptr() == t.data_ptr() and bf16.base[name].dtype == torch.bfloat16
        for model, src in pool.sources.items():
            assert bf16.source(model, name).data_ptr() == src.tensors[name].data_ptr()
    assert bf16.source("ft_shift", pool.tensor_names[0]).dtype == torch.float16
    assert bf16.nbytes == sum(t.numel() * t.element_size() for m in [pool.base, *pool.sources.values()]
                              for t in m.tensors.values())


@pytest.mark.parametrize("dtypes", [{"*": torch.float32}, {"*": torch.bfloat16, "ft_shift": torch.float16}],
                         ids=["fp32", "bf16+fp16"])
@pytest.mark.parametrize("method, params", [("ties", {}), ("breadcrumbs_ties", {"rescale": "l2"}),
                                            ("dare_ties", {}), ("dare_linear", {"rescale": "linf"}),
                                            ("dare_ties", {"rescale": "l2"}), ("della", {}), ("task_arithmetic", {}),
                                            ("slerp", {"t": 0.3}), ("model_stock", {})])
def test_histogram_thresholds_and_mixed_dtypes_equal_the_operators(micro_zoo, tmp_path, monkeypatch, dtypes,
                                                                   method, params):
    """Every tensor through the magnitude histograms (not the sorted tables small tensors get),
    every DARE norm through the kept-norm tables (only large tensors get them), and sources of
    other dtypes than the base's: the operators' merge, computed in fp32."""
    from fuse_evo.merge import engine as engine_module

    monkeypatch.setattr(engine_module, "_SORTED_UP_TO", 0)
    # 18 bits: a boundary bucket inverts 2**14 words, cheap at any size
    monkeypatch.setattr(ops.KeptNorms, "bits_for", staticmethod(lambda numel, size: 18))
    pool = _retyped_zoo(micro_zoo, tmp_path, dtypes)
    retyped = MergeEngine(pool, device="cpu")
    recipe = _recipe(method, **params)
    live = pool.new_model()  # the base's dtype: the operators' output dtype
    retyped.materialize(recipe, into=live)
    if method.startswith("dare"):  # the streams come back: now the kept-norm tables are built and used
        assert not retyped._kept
        retyped.materialize(recipe, into=live)
    merged = live.state_dict()
    # fp32 inside, rounded once to bf16 at the end: at most one bf16 step apart where the
    # fp32 sums differ in their last bit
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if merged[pool.tensor_names[0]].dtype == torch.float32 else {}
    for name in pool.tensor_names:
        expected = _reference(retyped, recipe, name)
        assert merged[name].dtype == expected.dtype
        torch.testing.assert_close(merged[name], expected, **tolerance, msg=lambda m: f"{method} {name}: {m}")
    if method in ("ties", "breadcrumbs_ties"):
        assert all(isinstance(t, ops.MagnitudeHistogram) for t in retyped._tables.values())
    if method.startswith("dare"):  # every source tensor's norm came from a table
        assert len(retyped._kept) == len(pool.tensor_names) * len(recipe.models)


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_ties"])
def test_a_merge_that_overflows_fp16_but_not_fp32_is_refused(micro_zoo, tmp_path, method):
    """fp16 sources and live model, coefficients whose merge fits fp32 but not fp16: the
    compiled writer's flag must see the fp16 overflow (the compiler folds away a cast back to
    fp32, so checking isfinite on the cast would not)."""
    from fuse_evo.merge.engine import NonFiniteMerge

    pool = _retyped_zoo(micro_zoo, tmp_path, {"*": torch.float16})
    engine = MergeEngine(pool, device="cpu")
    live = pool.new_model()
    assert next(live.parameters()).dtype == torch.float16
    engine.materialize(_recipe(method), into=live)  # ordinary weights: fine
    ordinary = _recipe(method)
    big = Recipe(method=method, models=ordinary.models, parameters={"lambda": 1e7}, groups=ordinary.groups,
                 seed=ordinary.seed)
    with pytest.raises(NonFiniteMerge, match="is not finite"):
        engine.materialize(big, into=live)


def _bf16_llama_pool(tmp_path, seed: int, **shape) -> ModelPool:
    """A random bf16 Llama as base and two perturbed copies ("a", "b") as sources."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=4096, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                         **shape)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    folders = {}
    for name in ("base", "a", "b"):
        if name != "base":
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * p.std() * torch.randn_like(p.float()).to(p.dtype))
        model.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    return ModelPool(folders["base"], {"a": folders["a"], "b": folders["b"]})


def test_the_tables_of_a_bf16_llama_stay_under_five_percent_of_its_sources(tmp_path):
    """A small bf16 Llama (tensors large enough for histograms) and 2 perturbed copies: after
    TIES and breadcrumbs candidates, the thresholds' tables hold well under 5% of the bytes."""
    pool = _bf16_llama_pool(tmp_path, 0, hidden_size=512, intermediate_size=1376, num_hidden_layers=2)
    engine = MergeEngine(pool, device="cpu")
    live = pool.new_model()
    for method, extra in (("ties", {}), ("breadcrumbs", {"gamma": 0.02})):
        for density in (0.2, 0.5, 0.9):
            recipe = Recipe(method, ("a", "b"), groups={"*": {"*": {"weight": 0.5, "density": density, **extra}}})
            engine.materialize(recipe, into=live)
    assert any(isinstance(t, ops.MagnitudeHistogram) for t in engine._tables.values())
    assert engine.table_bytes < 0.05 * engine.nbytes, (engine.table_bytes, engine.nbytes)


def test_table_passes_in_chunks_give_the_merges_of_one_pass(tmp_path, monkeypatch):
    """The histograms, refinements and kept-norm tables are built chunk by chunk in reused
    buffers (a fresh tensor-sized transient per pass costs page faults): with chunk bounds
    that cut every large tensor at odd offsets, TIES, breadcrumbs and DARE-TIES (its kept-norm
    tables, built when a seed comes back) merge bit for bit as with one pass per tensor, and
    the buffers are gone once a candidate is merged."""
    from fuse_evo.merge import engine as engine_module

    pool = _bf16_llama_pool(tmp_path, 1, hidden_size=1024, intermediate_size=256, num_hidden_layers=1)
    recipes = [Recipe("ties", ("a", "b"), groups={"*": {"*": {"weight": 0.6, "density": 0.3}}}),
               Recipe("breadcrumbs", ("a", "b"), groups={"*": {"*": {"weight": 0.5, "density": 0.7, "gamma": 0.05}}}),
               Recipe("dare_ties", ("a", "b"), seed=3, groups={"*": {"*": {"weight": 0.7, "density": 0.4}}}),
               Recipe("dare_ties", ("a", "b"), seed=3, groups={"*": {"*": {"weight": 0.7, "density": 0.6}}})]

    def merges() -> tuple[list[dict[str, torch.Tensor]], MergeEngine]:
        engine, live = MergeEngine(pool, device="cpu"), pool.new_model()
        out = []
        for recipe in recipes:
            engine.materialize(recipe, into=live)
            assert not engine._scratch
            out.append({k: v.clone() for k, v in live.state_dict().items()})
        return out, engine

    whole, one = merges()
    assert max(t.numel() for t in pool.base.tensors.values()) < engine_module._CHUNK  # one pass per tensor
    monkeypatch.setattr(engine_module, "_CHUNK", 1_000_003)  # 4 chunks of the embeddings, cut at odd offsets
    chunked, other = merges()
    assert other._kept and other._tables  # the kept-norm tables and histograms were built in chunks
    for a, b in zip(whole, chunked, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k
