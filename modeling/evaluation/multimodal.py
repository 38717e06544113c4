"""Evaluation of the multimodal model: VQA accuracy, retrieval R@1, modality alignment error."""

from __future__ import annotations

from collections.abc import Sequence


import numpy as np

from ..data.multimodal import CLASS_NAMES, QUESTION_KINDS, ModalityPool, Question, class_texts, question_inputs, split_words




def _normalize(embeddings) -> np.ndarray:
    array = np.asarray(embeddings, dtype=np.float64)
    return array / np.maximum(np.linalg.norm(array, axis=-1, keepdims=True), 1e-12)


def recall_at_1(queries, query_labels, gallery, gallery_labels) -> float:
    """Fraction of queries whose most similar (cosine) gallery item has the query's class.

    The pairs are class-level (a picture of a sneaker and any voice saying "sneaker" match), so a hit is the nearest
    gallery item being of the right class; with one gallery item per class this is zero-shot classification.
    """
    similarity = _normalize(queries) @ _normalize(gallery).T
    nearest = np.asarray(gallery_labels)[similarity.argmax(axis=1)]
    return float(np.mean(nearest == np.asarray(query_labels)))


def class_centroids(embeddings, labels, num_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """(num_classes, D) unit-length mean embedding of each class."""
    embeddings, labels = _normalize(embeddings), np.asarray(labels)
    missing = [c for c in range(num_classes) if not np.any(labels == c)]
    if missing:
        raise ValueError(f"class centroids need every class; classes {missing} have no item.")
    return _normalize(np.stack([embeddings[labels == c].mean(axis=0) for c in range(num_classes)]))


def centroid_misalignment(queries, query_labels, targets, target_labels) -> float:
    """Fraction of queries closer (cosine) to another class's centroid in the target modality than to their own."""
    centroids = class_centroids(targets, target_labels)
    similarity = _normalize(queries) @ centroids.T
    return float(np.mean(similarity.argmax(axis=1) != np.asarray(query_labels)))


def modality_alignment_error(embeddings: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """The modality alignment error reported by `scripts/eval_multimodal.py` (defined in the README).

    `embeddings`: modality -> (aligned embeddings (N, D), class labels (N,)). For every ordered pair of modalities
    (A, B), the error of A->B is the fraction of A's items whose aligned embedding is closer to the centroid of a
    different class in B than to the centroid of its own class in B. The modality alignment error is the mean over
    all ordered pairs: 0 when every item sits nearest its own class in every other modality, about 0.9 (1 - 1/10)
    for unrelated embedding spaces. Returns {"error": mean, "pairs": {"A->B": error}}.
    """
    pairs = {}
    for a, (a_emb, a_labels) in embeddings.items():
        for b, (b_emb, b_labels) in embeddings.items():
            if a != b:
                pairs[f"{a}->{b}"] = centroid_misalignment(a_emb, a_labels, b_emb, b_labels)
    return {"error": float(np.mean(list(pairs.values()))), "pairs": pairs}


def class_similarity_matrix(a_emb, a_labels, b_emb, b_labels, num_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """(num_classes, num_classes) mean cosine similarity between A's items of class i and B's items of class j."""
    similarity = _normalize(a_emb) @ _normalize(b_emb).T
    a_labels, b_labels = np.asarray(a_labels), np.asarray(b_labels)
    matrix = np.zeros((num_classes, num_classes))
    for i in range(num_classes):
        for j in range(num_classes):
            matrix[i, j] = similarity[np.ix_(a_labels == i, b_labels == j)].mean()
    return matrix


def answer_accuracy(questions: Sequence[Question], predictions: Sequence[str]) -> dict:
    """Exact-match accuracy (whitespace and case normalised) overall and per question kind."""
    if len(questions) != len(predictions):
        raise ValueError(f"{len(questions)} questions but {len(predictions)} predictions.")

    def norm(text: str) -> str:
        return " ".join(split_words(text.lower()))

    per_kind: dict[str, list[bool]] = {}
    for question, prediction in zip(questions, predictions):
        per_kind.setdefault(question.kind, []).append(norm(prediction) == norm(question.answer))
    everything = [hit for hits in per_kind.values() for hit in hits]
    return {"accuracy": float(np.mean(everything)) if everything else 0.0,
            "per_kind": {kind: float(np.mean(hits)) for kind, hits in per_kind.items()},
            "count": len(everything)}


def _batches(items: Sequence, size: int, desc: str, show_progress: bool):
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(items), size), desc=desc, unit="batch", disable=not show_progress, leave=False):
        yield items[start : start + size]


def predict_answers(model, processor, pool: ModalityPool, questions: Sequence[Question], batch_size: int = 64,
                    max_new_tokens: int = 4, show_progress: bool = True) -> list[str]:
    """Greedy answers of `model` (decoded new tokens, special tokens dropped), batch by batch."""
    import torch

    answers = []
    model.eval()
    with torch.inference_mode():
        for chunk in _batches(list(questions), batch_size, "Answering", show_progress):
            inputs = question_inputs(processor, pool, chunk, with_answers=False)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            answers += processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [a.strip() for a in answers]


def embed_pool(model, processor, pool: ModalityPool, batch_size: int = 128, show_progress: bool = True
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Aligned embeddings of every image, every clip and every class text of `pool`:
    modality -> (embeddings (N, D) float32, class labels (N,))."""
    import torch

    texts = [(text, label) for label in range(len(CLASS_NAMES)) for text in class_texts(label)]
    image_embeds, audio_embeds, text_embeds = [], [], []
    model.eval()
    with torch.inference_mode():
        for chunk in _batches(list(range(len(pool.images))), batch_size, "Embedding images", show_progress):
            inputs = processor.alignment_batch(images=[pool.images[i] for i in chunk])
            image_embeds.append(model.get_image_features(pixel_values=inputs["pixel_values"]))
        for chunk in _batches(list(range(len(pool.clips))), batch_size, "Embedding clips", show_progress):
            inputs = processor.alignment_batch(audio=[pool.clips[i] for i in chunk], sampling_rate=pool.sampling_rate)
            audio_embeds.append(model.get_audio_features(input_features=inputs["input_features"],
                                                         input_features_mask=inputs["input_features_mask"]))
        for chunk in _batches(texts, batch_size, "Embedding texts", show_progress):
            inputs = processor.alignment_batch(text=[t for t, _ in chunk])
            text_embeds.append(model.get_text_features(input_ids=inputs["input_ids"],
                                                       attention_mask=inputs["attention_mask"]))

    def stack(parts) -> np.ndarray:
        return torch.cat(parts).float().numpy()

    return {
        "image": (stack(image_embeds), pool.image_labels.copy()),
        "audio": (stack(audio_embeds), pool.clip_labels.copy()),
        "text": (stack(text_embeds), np.array([label for _, label in texts], dtype=np.int64)),
    }


RETRIEVAL_DIRECTIONS = (("image", "text"), ("text", "image"), ("audio", "text"), ("text", "audio"),
                        ("image", "audio"), ("audio", "image"))


def retrieval_scores(embeddings: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """R@1 for every direction "query->gallery" of `RETRIEVAL_DIRECTIONS`. Text galleries are the ten class names
    (the first text of each class), so image->text and audio->text are zero-shot classification; other galleries
    are all items of the split."""
    scores = {}
    for query, gallery in RETRIEVAL_DIRECTIONS:
        gallery_emb, gallery_labels = embeddings[gallery]
        if gallery == "text":
            first = [int(np.nonzero(gallery_labels == c)[0][0]) for c in range(len(CLASS_NAMES))]
            gallery_emb, gallery_labels = gallery_emb[first], gallery_labels[first]
        scores[f"{query}->{gallery}"] = recall_at_1(*embeddings[query], gallery_emb, gallery_labels)
    return scores


def evaluate_model(model, processor, pool: ModalityPool, questions: Sequence[Question], batch_size: int = 64,
                   show_progress: bool = True) -> dict:
    """VQA accuracy (overall and per kind), retrieval R@1 per direction and the modality alignment error of `model`
    on `pool` (the held-out split). Also returns the predictions and the embeddings (for plots)."""
    predictions = predict_answers(model, processor, pool, questions, batch_size, show_progress=show_progress)
    embeddings = embed_pool(model, processor, pool, 2 * batch_size, show_progress)
    return {
        "vqa": answer_accuracy(questions, predictions),
        "retrieval_r_at_1": retrieval_scores(embeddings),
        "alignment_error": modality_alignment_error(embeddings),
        "predictions": predictions,
        "embeddings": embeddings,
    }


def comparison_table(runs: dict[str, dict]) -> str:
    """Markdown table of held-out measurements, one column per run (run name -> `evaluate_model` summary with
    "vqa", "retrieval_r_at_1" and "alignment_error")."""
    names = list(runs)
    rows = ["| measure | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    rows.append("| VQA accuracy, all kinds | " + " | ".join(f"{100 * runs[n]['vqa']['accuracy']:.1f}%"
                                                          for n in names) + " |")
    for kind in QUESTION_KINDS:
        rows.append(f"| VQA: {kind} ({' + '.join(QUESTION_KINDS[kind][1])}) | "
                    + " | ".join(f"{100 * runs[n]['vqa']['per_kind'].get(kind, float('nan')):.1f}%" for n in names)
                    + " |")
    for direction, _ in runs[names[0]]["retrieval_r_at_1"].items():
        rows.append(f"| R@1 {direction} | " + " | ".join(f"{runs[n]['retrieval_r_at_1'][direction]:.3f}"
                                                         for n in names) + " |")
    rows.append("| modality alignment error | " + " | ".join(f"{runs[n]['alignment_error']['error']:.3f}"
                                                            for n in names) + " |")
    return "\n".join(rows)
