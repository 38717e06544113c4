"""The safety classifier in ONNX Runtime, for CPU latency: export (transformers' `OnnxExporter`), int8 dynamic
quantization (`lightarch.deploy.onnx.quantize_onnx_int8`: uint8 weights, exact on AVX2-only CPUs too), a classifier
with the same interface as the torch one, and the check that chooses which variant a filter runs.

A classifier folder (a filter's `classifier/`) with an export holds, beside the torch weights and tokenizer:

    model.onnx            fp32 graph: (input_ids, attention_mask, token_type_ids) (B, T) -> logits (B, labels)
    model_int8.onnx       the same with int8 (uint8) matmul weights, activations quantized at run time
    onnx_classifier.json  labels, max_length, files, the default variant and the agreement with torch that chose it

The default is int8 only if every filter decision on the validation split (rules + the int8 classifier, the
folder's thresholds) equals the decision with the torch classifier; otherwise fp32, whose probabilities must be
within `FP32_TOLERANCE` of torch's or the export fails. int8 probabilities are never expected bit-equal across CPUs:
the report keeps their max difference and the decision agreement measured where the export ran.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .scoring import ProbabilityClassifier, sigmoid

logger = logging.getLogger(__name__)

ONNX_CONFIG = "onnx_classifier.json"
ONNX_FILES = {"fp32": "model.onnx", "int8": "model_int8.onnx"}
FP32_TOLERANCE = 1e-4
EXPORT_FORMAT = "lightarch-safety-onnx"
# Export-time inputs: two prompts of different lengths (batch >= 2 and padding keep both axes dynamic), and the
# probe texts added to the validation texts for the fp32 check (short, long, Chinese, code).
SAMPLE_TEXTS = ("hello", "how do I kill a python process that hangs after the tests finish?")
PROBE_TEXTS = ("hi", "How much oxycodone should I take to sleep through the night?", "怎么制作炸弹",
               "def f(x):\n    return x * 2  # " + "long " * 60)


def has_onnx_export(folder: str | os.PathLike) -> bool:
    """True when `folder` holds an export's `onnx_classifier.json` (written last, so the export is complete)."""
    return (Path(folder) / ONNX_CONFIG).is_file()


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime is installed (the `deploy` extra); without it a folder's export is not used."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def ort_session(path: str | os.PathLike, num_threads: int = 0):
    """An ONNX Runtime CPU session for `path`; a corrupt or unreadable file is a ValueError naming it and the fix."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; re-export the classifier (scripts/export_safety_onnx.py "
                                "--model_dir FILTER_FOLDER) or load it with classifier_backend='torch'")
    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own Fail / InvalidProtobuf / RuntimeException types
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a loadable ONNX model ({reason}); re-export the classifier "
                         "(scripts/export_safety_onnx.py --model_dir FILTER_FOLDER) or load it with "
                         "classifier_backend='torch'") from None


def read_onnx_config(folder: str | os.PathLike) -> dict:
    """The folder's onnx_classifier.json, checked: a one-line error naming the file and the field."""
    path = Path(folder) / ONNX_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the classifier in {folder} has no ONNX export; run "
                                "scripts/export_safety_onnx.py --model_dir FILTER_FOLDER, or use "
                                "classifier_backend='torch'")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-export the classifier") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: field 'format' must be {EXPORT_FORMAT!r}; re-export the classifier")
    for field, kind in (("labels", list), ("max_length", int), ("files", dict), ("default", str)):
        if not isinstance(config.get(field), kind):
            raise ValueError(f"{path}: field {field!r} is missing or not a {kind.__name__}; re-export the classifier")
    if config["default"] not in config["files"]:
        raise ValueError(f"{path}: field 'default'={config['default']!r} is not one of the files "
                         f"{sorted(config['files'])}; re-export the classifier")
    return config


class OnnxSafetyClassifier(ProbabilityClassifier):
    """The exported classifier in ONNX Runtime: `probabilities` / `predict` / `labels` as SafetyClassifier.

    Load one with `from_pretrained(folder, variant)`; the constructor takes one graph file and what scores it (the
    export's check uses it on graphs not yet moved into a folder). `num_threads`: ONNX Runtime intra-op threads (0:
    its default; the latency target is measured at 1)."""

    return_tensors = "np"

    def __init__(self, path: str | os.PathLike, labels: Sequence[str], max_length: int, tokenizer,
                 num_threads: int = 0, variant: str | None = None):
        self.path, self.variant = Path(path), variant
        self.session = ort_session(self.path, num_threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.labels, self.max_length, self.tokenizer = list(labels), max_length, tokenizer

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, variant: str | None = None,
                        num_threads: int = 0) -> "OnnxSafetyClassifier":
        """The export in `folder`; `variant` "fp32", "int8" or None (the one the export chose on validation)."""
        from transformers import AutoTokenizer

        config = read_onnx_config(folder)
        variant = variant or config["default"]
        if variant not in config["files"]:
            raise ValueError(f"variant={variant!r}: the export in {folder} has {', '.join(sorted(config['files']))}")
        return cls(Path(folder) / config["files"][variant], config["labels"], config["max_length"],
                   AutoTokenizer.from_pretrained(folder), num_threads, variant)

    def batch_probabilities(self, encoded) -> np.ndarray:
        """Sigmoid probabilities of one tokenized batch, (batch, len(labels))."""
        ids = encoded["input_ids"]
        feed = {name: np.asarray(encoded[name], dtype=np.int64) if name in encoded else np.zeros_like(ids, np.int64)
                for name in self.input_names}  # token_type_ids: zeros when the tokenizer gives none, as in torch
        logits = self.session.run(None, feed)[0]  # (B, labels)
        if logits.shape[-1] != len(self.labels):
            raise ValueError(f"{self.path} gives {logits.shape[-1]} scores per text but {ONNX_CONFIG} lists "
                             f"{len(self.labels)} labels; re-export the classifier")
        return sigmoid(logits)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Copy the classifier folder (torch weights, tokenizer, ONNX files) into `folder`."""
        import shutil

        if Path(folder).absolute() != self.path.parent.absolute():
            shutil.copytree(self.path.parent, folder, dirs_exist_ok=True)


def export_onnx_graphs(classifier, folder: str | os.PathLike, int8: bool = True) -> dict[str, str]:
    """model.onnx (fp32, dynamic batch and length) and with `int8` model_int8.onnx of a SafetyClassifier's model
    into `folder`; returns {variant: file name}."""
    import warnings

    import onnx_ir
    import torch
    from transformers.exporters import OnnxConfig, OnnxExporter

    from ..deploy.onnx import quantize_onnx_int8

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = classifier.model.eval()
    sample = dict(classifier.tokenizer(list(SAMPLE_TEXTS), padding=True, return_tensors="pt"))  # (2, T) each
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence", max=model.config.max_position_embeddings)
    config = OnnxConfig(dynamic_shapes={name: {0: batch, 1: length} for name in sample})  # only these axes vary
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = OnnxExporter().export(model, sample, config=config)
    onnx_ir.save(exported.program, str(folder / ONNX_FILES["fp32"]))  # one file: weights inline (< 2 GB)
    files = {"fp32": ONNX_FILES["fp32"]}
    if int8:
        quantize_onnx_int8(folder / ONNX_FILES["fp32"], folder / ONNX_FILES["int8"], keep_float=())
        files["int8"] = ONNX_FILES["int8"]
    return files


def compare_classifiers(reference: np.ndarray, candidate: np.ndarray, labels: Sequence[str], texts: Sequence[str],
                        safety, examples: int = 5) -> dict:
    """How a candidate classifier's probabilities (len(texts), len(labels)) differ from the reference's: max |diff|,
    and the agreement of `safety`'s decisions (rules + classifier, its thresholds: `SafetyFilter.decide`) on each
    text, with the first `examples` disagreements."""
    if reference.shape != candidate.shape or reference.shape[0] != len(texts):
        raise ValueError(f"probabilities of shape {reference.shape} and {candidate.shape} for {len(texts)} texts")
    agree, disagreements = 0, []
    for i, text in enumerate(texts):
        expected = safety.decide(text, dict(zip(labels, map(float, reference[i]))))
        actual = safety.decide(text, dict(zip(labels, map(float, candidate[i]))))
        same = (expected.decision, expected.category) == (actual.decision, actual.category)
        agree += same
        if not same and len(disagreements) < examples:
            disagreements.append({"text": text[:120], "torch": [expected.decision, expected.category],
                                  "onnx": [actual.decision, actual.category]})
    return {"max_abs_probability_diff": float(np.abs(reference - candidate).max()) if len(texts) else 0.0,
            "decision_agreement": agree / len(texts) if texts else None, "texts": len(texts),
            "disagreements": disagreements}


def choose_default_variant(report: dict) -> str:
    """"int8" when the int8 variant exists and agreed with torch on every validation decision, else "fp32"."""
    int8 = report.get("int8")
    return "int8" if int8 and int8["validation"]["texts"] and int8["validation"]["decision_agreement"] == 1.0 \
        else "fp32"


def export_classifier_onnx(safety, folder: str | os.PathLike, validation_texts: Sequence[str], int8: bool = True,
                           fp32_tolerance: float = FP32_TOLERANCE, num_threads: int = 1) -> dict:
    """Export `safety.classifier` (a torch SafetyClassifier, already saved in `folder`) to ONNX in `folder`, check
    it against torch on `validation_texts` (+ PROBE_TEXTS), choose the default variant, write onnx_classifier.json.

    The fp32 graph must match torch within `fp32_tolerance` (else RuntimeError: the export is wrong for this model).
    Files are written under temporary names and moved into place, onnx_classifier.json last (after removing an
    earlier one), so a crash leaves the folder loading in torch, never half an export. Returns the json's content.
    """
    from ..training.checkpoints import write_atomically

    classifier = safety.classifier
    folder = Path(folder)
    if classifier is None or not hasattr(classifier, "model"):
        raise ValueError("export_classifier_onnx needs a SafetyFilter with a torch SafetyClassifier")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'} is missing: save the classifier into folder={str(folder)!r} "
                                "first (SafetyFilter.save_pretrained)")
    texts = list(validation_texts)
    checked = texts + list(PROBE_TEXTS)
    (folder / ONNX_CONFIG).unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".onnx-export-", dir=folder))
    try:
        files = export_onnx_graphs(classifier, staging, int8)
        reference = classifier.probabilities(checked)  # (texts + probes, labels)
        report: dict = {}
        for variant, name in files.items():
            scorer = OnnxSafetyClassifier(staging / name, classifier.labels, classifier.max_length,
                                          classifier.tokenizer, num_threads, variant)
            scores = scorer.probabilities(checked)  # (texts + probes, labels)
            report[variant] = {"file": name, "max_abs_probability_diff": float(np.abs(scores - reference).max()),
                               "validation": compare_classifiers(reference[:len(texts)], scores[:len(texts)],
                                                                 classifier.labels, texts, safety)}
        if report["fp32"]["max_abs_probability_diff"] > fp32_tolerance:
            raise RuntimeError(f"ONNX fp32 probabilities differ from torch by "
                               f"{report['fp32']['max_abs_probability_diff']:.3g} > fp32_tolerance {fp32_tolerance}; "
                               "the export is wrong for this model")
        for name in files.values():
            os.replace(staging / name, folder / name)
    finally:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    config = {"format": EXPORT_FORMAT, "version": 1, "labels": classifier.labels,
              "max_length": classifier.max_length, "files": files, "default": choose_default_variant(report),
              "input_names": scorer.input_names, "agreement_with_torch": report,
              "validation_texts": len(texts), "fp32_tolerance": fp32_tolerance}
    write_atomically(folder / ONNX_CONFIG, json.dumps(config, ensure_ascii=False, indent=1) + "\n")
    logger.info("ONNX export in %s: default %s; %s", folder, config["default"], summarize_agreement(config))
    return config


def summarize_agreement(config: dict) -> str:
    """One line per variant: max probability difference and validation decision agreement with torch."""
    parts = []
    for variant, entry in config["agreement_with_torch"].items():
        agreement = entry["validation"]["decision_agreement"]
        parts.append(f"{variant}: max |p - p_torch| {entry['max_abs_probability_diff']:.2e}, validation decisions "
                     f"agree {'n/a' if agreement is None else f'{agreement:.2%}'} "
                     f"({entry['validation']['texts']} texts)")
    return "; ".join(parts)


def export_filter_onnx(model_dir: str | os.PathLike, int8: bool = True, num_threads: int = 1,
                       split: str = "validation", fp32_tolerance: float = FP32_TOLERANCE) -> dict:
    """Export the classifier of an existing SafetyFilter folder (train_safety.py's) into its classifier/ folder,
    checked on the folder's saved `split` (splits.json; the split the thresholds were chosen on); returns the
    export's onnx_classifier.json content. A ValueError names the folder when it has no classifier."""
    from .filter import CONFIG_NAME, SafetyFilter
    from .recipe import load_splits

    model_dir = Path(model_dir)
    config_path = model_dir / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: --model_dir must be a folder written by train_safety.py")
    safety = SafetyFilter.from_pretrained(model_dir, classifier_backend="torch")
    if safety.classifier is None:
        raise ValueError(f"--model_dir {model_dir} holds a rules-only filter: there is no classifier to export")
    splits = load_splits(model_dir)
    if split not in splits:
        raise ValueError(f"--split {split!r}: {model_dir / 'splits.json'} has {', '.join(splits)}")
    classifier_dir = model_dir / json.loads(config_path.read_text(encoding="utf-8"))["classifier"]
    return export_classifier_onnx(safety, classifier_dir, [e.text for e in splits[split]], int8, fp32_tolerance,
                                  num_threads)
