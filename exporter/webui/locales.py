"""The board's words in English and Chinese, as data: element key -> (English, 中文).

Labels are what a component shows above itself; buttons and headings show theirs as their value. The language switch
re-labels every registered element from this table (`exporter/webui/app.py`).
"""

from __future__ import annotations

LANGS = {"en": "English", "zh": "中文"}

LABELS: dict[str, tuple[str, str]] = {
    # top row
    "title": ("## exporter — train, evaluate, chat, export", "## exporter — 训练、评估、对话、导出"),
    "lang": ("Language", "语言"),
    "model": ("Model path (HF dir)", "模型路径（HF 目录）"),
    "adapter": ("Adapter path (LoRA dir, optional)", "适配器路径（LoRA 目录，可选）"),
    "template": ("Chat template", "对话模板"),
    # tabs
    "tab_train": ("Train", "训练"),
    "tab_eval": ("Evaluate & Predict", "评估与预测"),
    "tab_chat": ("Chat", "对话"),
    "tab_export": ("Export", "导出"),
    # train: data
    "stage": ("Stage", "训练阶段"),
    "method": ("Method", "微调方法"),
    "dataset_dir": ("Data dir (holds dataset_info.json)", "数据目录（含 dataset_info.json）"),
    "dataset": ("Datasets", "数据集"),
    "data_preview_btn": ("Preview data", "预览数据"),
    # train: hyperparameters
    "learning_rate": ("Learning rate", "学习率"),
    "num_train_epochs": ("Epochs", "训练轮数"),
    "max_grad_norm": ("Max gradient norm", "最大梯度范数"),
    "max_samples": ("Max samples per dataset", "每个数据集的最大样本数"),
    "compute_type": ("Compute type", "计算类型"),
    "cutoff_len": ("Cutoff length", "截断长度"),
    "batch_size": ("Batch size (per device)", "批处理大小（每设备）"),
    "gradient_accumulation_steps": ("Gradient accumulation", "梯度累积"),
    "val_size": ("Validation size", "验证集比例"),
    "lr_scheduler_type": ("LR scheduler", "学习率调节器"),
    "extra_tab": ("Extra settings", "其它参数设置"),
    "logging_steps": ("Logging steps", "日志间隔"),
    "save_steps": ("Save steps", "保存间隔"),
    "warmup_steps": ("Warmup steps", "预热步数"),
    "max_steps": ("Max steps (-1: by epochs)", "最大步数（-1：按轮数）"),
    "optim": ("Optimizer", "优化器"),
    "seed": ("Seed", "随机种子"),
    "packing": ("Packing", "序列打包"),
    "train_on_prompt": ("Train on prompt", "学习提示词"),
    "identity_name": ("identity_name ({{name}} in the data)", "identity_name（数据中的 {{name}}）"),
    "identity_author": ("identity_author ({{author}} in the data)", "identity_author（数据中的 {{author}}）"),
    "extra_args": ("Extra arguments (JSON: LLaMA-Factory keys)", "额外参数（JSON：LLaMA-Factory 参数）"),
    "lora_tab": ("LoRA settings", "LoRA 参数设置"),
    "lora_rank": ("LoRA rank", "LoRA 秩"),
    "lora_alpha": ("LoRA alpha", "LoRA 缩放系数"),
    "lora_dropout": ("LoRA dropout", "LoRA 随机丢弃"),
    "loraplus_lr_ratio": ("LoRA+ LR ratio (0: off)", "LoRA+ 学习率比例（0：关闭）"),
    "lora_target": ("LoRA modules (empty: all linear)", "LoRA 作用模块（留空：全部线性层）"),
    "use_rslora": ("rsLoRA", "rsLoRA"),
    "use_dora": ("DoRA", "DoRA"),
    # train: run
    "output_dir": ("Output dir", "输出目录"),
    "overwrite_output_dir": ("Overwrite a finished output dir", "覆盖已完成的输出目录"),
    "preview_btn": ("Preview command", "预览命令"),
    "start_btn": ("Start", "开始"),
    "resume_btn": ("Resume", "继续训练"),
    "stop_btn": ("Stop", "中断"),
    "command": ("Command line", "命令行"),
    "yaml": ("YAML config", "YAML 配置"),
    "train_output": ("Output", "输出"),
    "loss_plot": ("Training loss", "训练损失"),
    # chat
    "chat_path": (
        "Chat with (a merged dir or .gguf file, e.g. from the last export; empty: the model + adapter above)",
        "对话模型（合并目录或 .gguf 文件，如上次导出的结果；留空：上方的模型 + 适配器）",
    ),
    "chat_backend": ("Inference backend", "推理引擎"),
    "chat_dtype": ("Inference dtype", "推理数据类型"),
    "chat_load_btn": ("Load model", "加载模型"),
    "chat_unload_btn": ("Unload model", "卸载模型"),
    "chatbot": ("Chat", "对话"),
    "query": ("Message", "输入"),
    "send_btn": ("Submit", "提交"),
    "chat_stop_btn": ("Stop", "停止"),
    "clear_btn": ("Clear history", "清空历史"),
    "system": ("System prompt", "系统提示词"),
    "max_new_tokens": ("Maximum new tokens", "最大生成长度"),
    "temperature": ("Temperature", "温度系数"),
    "top_p": ("Top-p", "Top-p 采样值"),
    "top_k": ("Top-k (0: off)", "Top-k（0：关闭）"),
    "repetition_penalty": ("Repetition penalty", "重复惩罚"),
    # evaluate & predict
    "eval_path": (
        "Model (a merged dir or .gguf file, e.g. from the last export; empty: the model + adapter above)",
        "模型（合并目录或 .gguf 文件，如上次导出的结果；留空：上方的模型 + 适配器）",
    ),
    "predict_box": (
        "Predict (BLEU-4 / ROUGE on datasets of the data dir)",
        "预测（数据目录中的数据集，BLEU-4 / ROUGE）",
    ),
    "eval_dataset": ("Datasets (from the Train tab's data dir)", "数据集（来自训练页的数据目录）"),
    "do_sample": ("Sample (off: greedy)", "采样（关闭：贪心解码）"),
    "predict_btn": ("Start predict", "开始预测"),
    "bench_box": ("Evaluate (MMLU / C-Eval / CMMLU accuracy)", "评测（MMLU / C-Eval / CMMLU 准确率）"),
    "eval_task": ("Benchmark", "评测任务"),
    "task_dir": ("Benchmark dir (LF's evaluation/)", "评测数据目录（LF 的 evaluation/）"),
    "eval_template": ("Prompt template", "提示模板"),
    "eval_lang": ("Prompt language", "提示语言"),
    "n_shot": ("Few-shot examples", "少样本示例数"),
    "eval_batch_size": ("Batch size", "批处理大小"),
    "max_questions": ("Questions per subject (0: all)", "每个科目的题数（0：全部）"),
    "save_dir": ("Save dir (must not exist)", "保存目录（须不存在）"),
    "bench_btn": ("Start evaluation", "开始评测"),
    "eval_stop_btn": ("Stop", "中断"),
    "eval_log": ("Log", "日志"),
    "eval_table": ("Scores", "评估结果"),
    # export
    "export_out": ("Export dir", "导出目录"),
    "merge_dtype": ("Merged dtype", "合并精度"),
    "quant_method": ("Quantize (HF dir)", "量化（HF 目录）"),
    "quant_bits": ("Quantization bits", "量化位数"),
    "quant_dataset": ("Calibration dataset (from the data dir)", "校准数据集（来自数据目录）"),
    "gguf_types": ("GGUF types", "GGUF 类型"),
    "ollama_name": ("Ollama model name", "Ollama 模型名"),
    "verify": ("Verify the export", "验证导出结果"),
    "verify_prompts": ("Chat prompts compared (verify)", "对比的对话提示数（验证）"),
    "export_btn": ("Export", "开始导出"),
    "export_stop_btn": ("Stop", "中断"),
    "export_log": ("Log", "日志"),
    "verify_table": ("Verify checks", "验证检查"),
    "ollama_commands": ("Import into Ollama", "导入 Ollama"),
}

# words inside rendered status text and progress (not component labels)
WORDS: dict[str, tuple[str, str]] = {
    "auto": ("auto (the model's own template)", "auto（模型自带模板）"),
    "none": ("none", "不量化"),
    "preparing": ("Preparing (loading the model and tokenizing the data)…", "准备中（加载模型、处理数据）…"),
    "running": ("running", "运行中"),
    "finished": ("Finished", "已完成"),
    "failed": ("Failed", "失败"),
    "stopped": ("Stopped", "已中断"),
    "pending": ("pending", "等待"),
    "skipped": ("skipped", "跳过"),
    "busy": ("A run is already in progress; stop it first.", "已有任务在运行，请先中断。"),
    "resume_from": ("Resume continues from", "继续训练将从此处开始："),
    "no_checkpoint": (
        "No checkpoint saved yet (every save_steps); Start begins again.",
        "尚未保存检查点（每 save_steps 步保存一次）；开始将重新训练。",
    ),
    "step": ("step", "步"),
    "elapsed": ("elapsed", "已用时"),
    "eta": ("ETA", "剩余"),
    "no_rows": ("No rows to preview.", "没有可预览的数据。"),
    "tokens": ("tokens", "个词元"),
    "trained": ("trained", "参与训练"),
    "row": ("row", "行"),
    "verify_word": ("Verify", "验证"),
    "passed": ("passed", "通过"),
    "failed_n": ("failed", "失败"),
    "skipped_n": ("skipped", "跳过"),
    "saved_config": ("Config saved to", "配置已保存至"),
    "stopping": ("Stopping…", "正在中断…"),
    "no_model": ("No model loaded.", "未加载模型。"),
    "loaded": ("Loaded", "已加载"),
    "metric": ("metric", "指标"),
    "score": ("score", "分数"),
    "nothing_running": ("Nothing is running.", "没有正在运行的任务。"),
}


def label(key: str, lang: str) -> str:
    """A component's label in `lang` (en or zh)."""
    en, zh = LABELS[key]
    return zh if lang == "zh" else en


def word(key: str, lang: str) -> str:
    """A word of rendered status text in `lang`."""
    en, zh = WORDS[key]
    return zh if lang == "zh" else en
