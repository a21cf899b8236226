"""What a continuous thought holds (Hao et al. 2024, §5): on ProsQA-style problems, the probability the LM
head gives each graph node after each latent step, against the breadth-first frontier and the nodes' value;
the thoughts' norms and nearness to token embeddings. `coconut-analyze` is the command line."""
from .cli import analyze, load_checkpoint, main
from .graph import GraphInfo, graph_info
from .thoughts import aggregate_steps, node_token_ids, pearson, step_node_sets, thought_rows

__all__ = ["analyze", "load_checkpoint", "main", "GraphInfo", "graph_info", "aggregate_steps", "node_token_ids",
           "pearson", "step_node_sets", "thought_rows"]
