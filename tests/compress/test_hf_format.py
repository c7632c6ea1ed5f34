"""Shipping a compressed model as a Hugging Face model directory, and back to dense.

The models are loaded in a subprocess where ``import tunecomp_kernels`` fails
(scripts/load_without_tunecomp.py), as on a machine without the package.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit

from tunecomp_kernels.compress import (
    TuneCompConfig,
    compress_to_budget,
    load_compressed,
    merge_and_unload,
    read_metadata,
    save_compressed,
)
from tunecomp_kernels.compress.hf_format import MODELING_FILE, modeling_source
from tunecomp_kernels.nn import MaskedLowRankLinear

pytest.importorskip("transformers")

SCRIPT = Path(__file__).parent / "scripts" / "load_without_tunecomp.py"
FAMILIES = {
    "bert": (tiny_bert, "AutoModelForSequenceClassification"),
    "gpt2": (tiny_gpt2, "AutoModelForCausalLM"),
    "llama": (tiny_llama, "AutoModelForCausalLM"),
    "vit": (tiny_vit, "AutoModelForImageClassification"),
}
TEXT = "hello world foo hello"


def compressed(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny model of ``family`` truncated to 40% of its targeted parameters."""
    model = FAMILIES[family][0]().to(dtype)
    compress_to_budget(model, TuneCompConfig(target_ratio=0.4))
    assert any(isinstance(m, MaskedLowRankLinear) for m in model.modules())
    return model.eval()


def inputs_for(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(0, VOCAB, (2, 8), generator=g)}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "hello", "world"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def image_processor():
    import transformers

    # The PIL processor: the default one needs torchvision, which is optional.
    cls = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)
    return cls(size={"height": 16, "width": 16})


def run_isolated(cases: list[dict], where: Path) -> dict:
    """Run the loader script on ``cases`` in a fresh interpreter without the package."""
    torch.save(cases, where / "cases.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_MODULES_CACHE=str(where / "hf_modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-I", str(SCRIPT), str(where / "cases.pt"),
                           str(where / "results.json")], cwd=where, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((where / "results.json").read_text())


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """Every family saved compressed (BERT with a tokenizer, Llama also in bfloat16) and
    merged back to dense, loaded in one isolated subprocess."""
    root = tmp_path_factory.mktemp("ship")
    cases, dirs = [], {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess: bit-equal convolutions and matmuls
    try:
        return _ship_all(root, cases, dirs)
    finally:
        torch.set_num_threads(threads)


def _ship_all(root: Path, cases: list[dict], dirs: dict) -> tuple[dict, dict]:
    variants = [(f, torch.float32) for f in FAMILIES] + [("llama", torch.bfloat16)]
    for family, dtype in variants:
        name = family if dtype == torch.float32 else f"{family}_bf16"
        model, inputs = compressed(family, dtype), inputs_for(family)
        tokenizer = {"bert": word_tokenizer, "vit": image_processor}.get(family, lambda: None)()
        path = save_compressed(model, root / name, tokenizer=tokenizer)
        want = logits(load_compressed(path), inputs)
        assert torch.equal(want, logits(model, inputs))
        case = {"name": name, "dir": str(path), "auto": FAMILIES[family][1], "remote": True,
                "inputs": inputs, "expected": want}
        if family == "bert":
            case.update(text=TEXT, expected_ids=tokenizer(TEXT)["input_ids"])
        if family == "vit":
            image = torch.randint(0, 256, (20, 20, 3), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(5))
            case.update(image=image, expected_pixels=tokenizer(
                image.numpy(), return_tensors="pt")["pixel_values"])
        cases.append(case)
        dirs[name] = path
        if dtype == torch.float32:
            merged = merge_and_unload(copy.deepcopy(model))
            merged.save_pretrained(root / f"{name}_merged")
            dirs[f"{name}_merged"] = root / f"{name}_merged"
            cases.append({"name": f"{name}_merged", "dir": str(root / f"{name}_merged"),
                          "auto": FAMILIES[family][1], "remote": False, "inputs": inputs,
                          "expected": want})
    return dirs, run_isolated(cases, root)


def test_loader_really_hides_the_package(shipped):
    _, results = shipped
    assert results["blocked"] is True
    assert results["imported"] == []


@pytest.mark.parametrize("name", [*FAMILIES, "llama_bf16"])
def test_remote_code_loads_the_exact_compressed_model_without_the_package(shipped, name):
    _, results = shipped
    got = results["cases"][name]
    assert "error" not in got, got.get("error")
    assert got["equal"], got
    assert got["cls"].startswith("TuneComp")
    assert got["module"].startswith("transformers_modules.")
    assert "LowRankLinear" in got["layer_types"]
    assert got["dtype"] == ("torch.bfloat16" if name.endswith("bf16") else "torch.float32")


@pytest.mark.parametrize("name", [*FAMILIES, "llama_bf16"])
def test_plain_transformers_refuses_the_compressed_dir(shipped, name):
    # Loading it as the dense model would fill the low-rank layers with random weights.
    got = shipped[1]["cases"][name]
    assert got["refused_without_remote_code"] is not None
    assert "trust_remote_code" in got["refused_without_remote_code"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merged_model_loads_in_plain_transformers(shipped, family):
    dirs, results = shipped
    got = results["cases"][f"{family}_merged"]
    assert "error" not in got, got.get("error")
    assert got["module"].startswith("transformers.models.")
    assert got["max_abs_diff"] <= 1e-5 * max(1.0, got["scale"]), got
    assert "LowRankLinear" not in got["layer_types"]
    assert ("Conv1D" in got["layer_types"]) == (family == "gpt2")
    files = sorted(p.name for p in dirs[f"{family}_merged"].iterdir())
    assert not any(f.endswith(".py") or f == "tunecomp.json" for f in files), files
    config = json.loads((dirs[f"{family}_merged"] / "config.json").read_text())
    assert "auto_map" not in config and not config["model_type"].startswith("tunecomp")


def test_tokenizer_and_image_processor_are_saved_and_load(shipped):
    dirs, results = shipped
    assert results["cases"]["bert"]["ids_equal"] is True
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(read_metadata(dirs["bert"])["files"])
    assert results["cases"]["vit"]["pixels_equal"] is True
    assert "preprocessor_config.json" in read_metadata(dirs["vit"])["files"]


@pytest.mark.parametrize("name", [*FAMILIES, "llama_bf16"])
def test_saved_dir_lists_every_file_and_keeps_load_compressed(shipped, name):
    path = shipped[0][name]
    meta = read_metadata(path)
    on_disk = {p.name for p in path.iterdir()}
    assert on_disk == set(meta["files"])
    assert {"config.json", MODELING_FILE, "model.safetensors", "tunecomp.json"} <= on_disk
    assert (path / MODELING_FILE).read_bytes() == modeling_source()
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"].startswith("tunecomp_")
    assert set(config["tunecomp"]["layers"]) == set(meta["layers"])
    assert config["dtype"] == meta["dtype"]


def test_modeling_file_imports_only_torch_and_transformers():
    source = modeling_source().decode()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines()
               if line.startswith(("import ", "from "))}
    assert imports == {"__future__", "typing", "torch", "transformers"}


def test_save_with_clashing_extra_file_or_bad_tokenizer_is_refused(tmp_path):
    model = compressed("bert")
    with pytest.raises(ValueError, match="config.json"):
        save_compressed(model, tmp_path / "a", extra_files={"config.json": b"{}"})
    with pytest.raises(TypeError, match="save_pretrained"):
        save_compressed(model, tmp_path / "b", tokenizer=object())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_non_hf_model_gets_no_config_json(tmp_path):
    from tiny_models import block_net

    model = block_net()
    compress_to_budget(model, TuneCompConfig(target_ratio=0.4))
    path = save_compressed(model, tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "tunecomp.json"]
