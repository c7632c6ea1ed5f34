"""Load shipped models with plain transformers while ``tunecomp_kernels`` cannot be imported.

Usage: python load_without_tunecomp.py CASES.pt RESULTS.json

CASES.pt holds a list of dicts: ``name``, ``dir``, ``auto`` (an AutoModel* class name),
``remote`` (load with trust_remote_code=True), ``inputs`` (model kwargs) and ``expected``
(the logits the test computed with tunecomp_kernels); optionally ``text`` and
``expected_ids`` for a tokenizer saved with the model, ``image`` and ``expected_pixels``
for an image processor. RESULTS.json gets, per case, what
happened, plus whether importing tunecomp_kernels was refused and whether any of it got
imported anyway.
"""

import importlib.abc
import json
import sys


class RefuseTunecomp(importlib.abc.MetaPathFinder):
    """Makes ``import tunecomp_kernels`` (and its submodules) fail in this process."""

    def find_spec(self, name, path=None, target=None):
        if name == "tunecomp_kernels" or name.startswith("tunecomp_kernels."):
            raise ImportError(f"{name} is hidden from this process")
        return None


sys.meta_path.insert(0, RefuseTunecomp())

import torch  # noqa: E402
import transformers  # noqa: E402


def refused(auto, directory):
    """The error plain transformers gives without trust_remote_code (None: it loaded)."""
    try:
        auto.from_pretrained(directory, trust_remote_code=False)
    except Exception as exc:  # any refusal is fine; loading is not
        return f"{type(exc).__name__}: {exc}"
    return None


def run_case(case):
    auto = getattr(transformers, case["auto"])
    out = {}
    if case["remote"]:
        out["refused_without_remote_code"] = refused(auto, case["dir"])
        model = auto.from_pretrained(case["dir"], trust_remote_code=True)
    else:
        model = auto.from_pretrained(case["dir"])
    model.eval()
    with torch.no_grad():
        got = model(**case["inputs"]).logits
    want = case["expected"]
    out.update(cls=type(model).__name__, module=type(model).__module__,
               dtype=str(got.dtype), equal=bool(torch.equal(got, want)),
               max_abs_diff=float((got.double() - want.double()).abs().max()),
               scale=float(want.double().abs().max()),
               layer_types=sorted({type(m).__name__ for m in model.modules()}))
    if "text" in case:
        tok = transformers.AutoTokenizer.from_pretrained(case["dir"])
        out["ids_equal"] = tok(case["text"])["input_ids"] == case["expected_ids"]
    if "image" in case:
        proc = transformers.AutoImageProcessor.from_pretrained(case["dir"])
        pixels = proc(case["image"].numpy(), return_tensors="pt")["pixel_values"]
        out["pixels_equal"] = bool(torch.equal(pixels, case["expected_pixels"]))
    return out


def main():
    torch.set_num_threads(1)
    cases = torch.load(sys.argv[1], weights_only=True)
    results = {"cases": {}}
    try:
        import tunecomp_kernels  # noqa: F401
        results["blocked"] = False
    except ImportError:
        results["blocked"] = True
    for case in cases:
        try:
            results["cases"][case["name"]] = run_case(case)
        except Exception as exc:
            results["cases"][case["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
    results["imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "tunecomp_kernels")
    with open(sys.argv[2], "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
