"""nbval settings for the course notebooks.

`make test` runs them with `pytest --nbval-lax --nbval-current-env`: every cell must run
without error, and only cells marked `# NBVAL_CHECK_OUTPUT` (numbers that are part of the
lesson: parameter counts, shapes) are compared with the committed outputs. For those cells,
rich outputs that differ by design between runs (plotly JSON, widget views, HTML, images,
stderr progress bars) are left out of the comparison.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += (
            "text/html", "application/javascript", "application/vnd.plotly.v1+json",
            "application/vnd.jupyter.widget-view+json", "image/png", "image/svg+xml", "stderr",
        )
