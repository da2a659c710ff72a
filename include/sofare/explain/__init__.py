"""Explanations of SofareM3's predictions: Captum's Integrated Gradients for the torch model
(`attributions`), SHAP's TreeExplainer for the gradient-boosted baseline (`tree`).

Imported only by serving's `/explain` path and by reporting code, never at DAG top level: torch, captum
and shap are cold imports.
"""
