"""Shared fixtures: a tiny tokenizer and a tiny random GPT-NeoX saved as a HF directory."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest -n N: N worker processes share the cores; torch's own threads on top of them would
    # oversubscribe (set before anything imports torch).
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(_threads))

#: SLURM_CONF that :func:`_slurm_down_fast` points this session at (``tests/test_slurm.py`` removes it).
SLURM_DOWN_CONF_VAR = "MEMCTL_TEST_SLURM_DOWN_CONF"


def _slurm_down_fast() -> None:
    """Every ``snakemake`` the tests start imports the SLURM executor plugin, whose import asks
    ``scontrol show config`` for MinJobAge. Where SLURM's client is installed but no controller
    runs (a machine after ``tests/test_slurm.py`` stopped its local cluster), scontrol retries for
    its MessageTimeout: 9 s of every Snakemake start. The tests' runs outside that module use a copy
    of the SLURM config that gives up after 1 s; ``tests/test_slurm.py`` removes it for its cluster."""
    import shutil
    import tempfile
    from pathlib import Path

    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    if shutil.which("scontrol") is None or not conf.is_file() or SLURM_DOWN_CONF_VAR in os.environ:
        return
    import atexit

    tmp = tempfile.mkdtemp(prefix="memctl-tests-slurm-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    down = Path(tmp) / "slurm.conf"
    down.write_text(conf.read_text(encoding="utf-8") + "\n# tests/conftest.py: give up on a stopped controller\n"
                    "MessageTimeout=2\n", encoding="utf-8")
    os.environ[SLURM_DOWN_CONF_VAR] = str(down)
    os.environ["SLURM_CONF"] = str(down)


_slurm_down_fast()

TEXT = (
    "The quick brown fox jumps over the lazy dog. " * 3
    + "def add(a, b):\n    return a + b\n" * 3
    + "Pack my box with five dozen liquor jugs. 0123456789 " * 3
)

#: Hub architectures the loading / editing code must serve, as tiny random models.
ARCHITECTURES = ["gpt_neox", "gpt_neo", "gpt2", "olmo2"]


def tiny_architecture_config(kind, vocab=300, eos=0):
    """A 2-layer, width-32 config of a hub architecture (fused QKV, Conv1D, gated MLP...): the
    suite's one tiny model definition (``ARCHITECTURES`` here; ``tests/test_families.py`` runs
    every one of its seven kinds through every stage)."""
    import transformers as tf

    common = {"vocab_size": vocab, "bos_token_id": eos, "eos_token_id": eos}
    llama_like = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "intermediate_size": 64, "max_position_embeddings": 64, "pad_token_id": eos, **common}
    if kind == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64, **common)
    if kind == "gpt_neo":
        return tf.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                               window_size=16, max_position_embeddings=64, **common)
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
    if kind == "llama":
        return tf.LlamaConfig(**llama_like)
    if kind == "olmo2":
        return tf.Olmo2Config(**llama_like)
    if kind == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if kind == "mistral":
        return tf.MistralConfig(sliding_window=None, **llama_like)
    raise ValueError(kind)


def tiny_architecture_model(kind, seed=0):
    """A tiny random model of a hub architecture, in eval mode (eager attention for GPT-Neo)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = {"attn_implementation": "eager"} if kind == "gpt_neo" else {}
    return AutoModelForCausalLM.from_config(tiny_architecture_config(kind), **kwargs).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A 2-layer GPT-NeoX with random weights (seeded) and the tiny tokenizer, in one directory."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = GPTNeoXForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from memctl.models import load_model

    return load_model(tiny_model_dir, {"source": "local", "dtype": "float32", "device": "cpu"})


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from memctl.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


# ----------------------------------------------------------------------------- the shared tiny store


def _fingerprint(store):
    """Every file of the store but Snakemake's own records (``.snakemake/``): path -> (size, mtime)."""
    return {
        str(p.relative_to(store)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in store.rglob("*")
        if p.is_file() and ".snakemake" not in p.parts
    }


def _shared_root(tmp_path_factory):
    """Where session-wide artifacts live: this session's temporary directory, or under pytest-xdist
    (``pytest -n 2``) the directory its workers' temporary directories share, so that they build
    the tiny store once between them."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """The tiny config's whole plan, every job run by hand once per session (``tests/tiny_store.py``):
    a working directory with ``config/config.yaml`` and ``results/``. Read it in place, never change
    it (the session checks at its end); copy it (fixture ``tiny_store_copy``) to change anything.

    Under pytest-xdist the first worker that asks builds it while the others wait on a file lock; a
    build that failed half way (no ``build_seconds.json``) is removed and built again."""
    import json
    import shutil

    from filelock import FileLock

    import tiny_store as ts

    root = _shared_root(tmp_path_factory)
    work = root / "tiny_store" / "work"
    done = work / "build_seconds.json"
    with FileLock(str(root / "tiny_store.lock")):
        if not done.exists():
            shutil.rmtree(work.parent, ignore_errors=True)  # this fixture's own half-built store
            work.parent.mkdir(parents=True)
            seconds = ts.build(work)
            done.write_text(json.dumps(seconds, indent=1))
    before = _fingerprint(work)
    yield work
    after = _fingerprint(work)
    changed = sorted(set(before) ^ set(after) | {k for k in before if k in after and before[k] != after[k]})
    assert not changed, f"a test changed the shared tiny store (copy it instead): {changed[:10]}"


@pytest.fixture(scope="session")
def tiny_plan(tiny_store):
    """The plan of the shared tiny store (paths relative to it)."""
    import tiny_store as ts

    return ts.plan_of(tiny_store)


@pytest.fixture
def tiny_store_copy(tiny_store, tmp_path):
    """A private copy of the shared tiny store, to change."""
    import tiny_store as ts

    return ts.copy(tiny_store, tmp_path / "work")


#: Test files in the order their (measured) wall time asks them to start: the longest first, so that
#: pytest-xdist's per-file scheduling (``--dist loadfile --no-loadscope-reorder`` in pyproject.toml:
#: files in collection order; by default xdist reorders them by their number of tests, which put the
#: two-test SLURM file near the end) does not start a 7-minute file last. Measured 2026-12-07 on the idle 2-vCPU VM (`--durations`):
#: test_slurm's SLURM run 449 s, test_integrity's lab and kills ~8 min together, test_cache's
#: second user 122 s, test_workflow's determinism and hub-format runs 90 s.
LONGEST_FIRST = ("test_slurm.py", "test_integrity.py", "test_cache.py", "test_workflow.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first (:data:`LONGEST_FIRST`, then any other file holding a ``slow``
    test); every file's tests keep their order (a stable sort by file)."""
    slow_files = {item.path.name for item in items if item.get_closest_marker("slow")}

    def rank(item):
        name = item.path.name
        if name in LONGEST_FIRST:
            return LONGEST_FIRST.index(name)
        return len(LONGEST_FIRST) + (0 if name in slow_files else 1)

    items.sort(key=rank)

