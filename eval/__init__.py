"""Evaluators: zero-shot classification and cross-modal retrieval.

Metric functions (eval.metrics) are pure functions of embeddings and labels; the runners
(eval.zero_shot, eval.retrieval) embed a dataset with a model and call them.
"""
