"""Units of the curriculum trainer (`coconut_kernels.train`): the config (`config`), the data (`data`), the
tokenizer, model and optimizer (`build`), the distributed wrapper (`distributed`), the loop (`loop`),
evaluation (`evaluate`), checkpoints (`checkpoint`), the save folder's ownership (`savedir`) and the metric
log (`metrics`); `context` is what one process of a run holds while it trains."""
from .checkpoint import latest_checkpoint, load_trainer_state, load_weights, save_checkpoint
from .config import TrainConfig, load_config
from .evaluate import evaluate
from .metrics import MetricsLog, format_eval_table, read_csv

__all__ = ["TrainConfig", "load_config", "evaluate", "save_checkpoint", "load_weights", "load_trainer_state",
           "latest_checkpoint", "MetricsLog", "format_eval_table", "read_csv"]
