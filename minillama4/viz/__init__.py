"""minillama4.viz: plotly figures and ipywidgets explorers for the course notebooks.

    from minillama4 import viz
    viz.expert_load_heatmap(trace.load_matrix(), trace.moe_layers)   # a plotly Figure
    viz.routing_explorer(trace, ml4.ByteTokenizer())                  # a widget (last expression)

`plots` holds pure figure builders (tensors, configs, ParamCounts in; `go.Figure` out);
`widgets` wires them to ipywidgets controls. Needs the `notebooks` extra (plotly, ipywidgets);
`import minillama4` alone never imports this package.
"""

from .plots import (attention_mask_figure, domain_expert_preference, expert_colours, expert_load_bar,
                    expert_load_heatmap, load_over_training, loss_curves, memory_by_format,
                    param_breakdown, rope_frequencies, router_score_histogram, temperature_curve,
                    token_expert_colouring, token_expert_html)
from .widgets import (ConfigExplorer, MaskExplorer, RoutingExplorer, config_explorer, mask_explorer,
                      routing_explorer, show_figure)

__all__ = ["attention_mask_figure", "domain_expert_preference", "expert_colours", "expert_load_bar",
           "expert_load_heatmap", "load_over_training", "loss_curves", "memory_by_format",
           "param_breakdown", "rope_frequencies", "router_score_histogram", "temperature_curve",
           "token_expert_colouring", "token_expert_html", "ConfigExplorer", "MaskExplorer",
           "RoutingExplorer", "config_explorer", "mask_explorer", "routing_explorer", "show_figure"]
