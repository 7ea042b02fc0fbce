"""Rich results: matplotlib PNGs with chart objects, DataFrames as data."""

from __future__ import annotations

import base64

from e2b_code_interpreter import Sandbox
from e2b_code_interpreter.charts import (
    BarChart,
    BoxAndWhiskerChart,
    ChartType,
    LineChart,
    PieChart,
    ScatterChart,
    SuperChart,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

LINE = """
import datetime
import matplotlib.pyplot as plt
import numpy as np

dates = [datetime.date(2023, 9, 1) + datetime.timedelta(days=i) for i in range(50)]
x = np.linspace(0, 2 * np.pi, 50)
plt.figure()
plt.plot(dates, np.sin(x), label='sin(x)')
plt.plot(dates, np.cos(x), label='cos(x)')
plt.xlabel('Time (s)')
plt.ylabel('Amplitude [Hz]')
plt.title('Waves')
plt.show()
"""

BAR = """
import matplotlib.pyplot as plt
plt.figure()
plt.bar(['A', 'B', 'C'], [1, 5, 3], label='Sold')
plt.xlabel('Author')
plt.ylabel('Books')
plt.title('Sales')
plt.show()
"""

FIGURE_AS_LAST_EXPRESSION = """
import matplotlib.pyplot as plt
fig, ax = plt.subplots()
ax.scatter([1, 2, 3], [3, 1, 2], label='dots')
ax.set_yscale('log')
plt.close(fig)
fig
"""

PIE_AND_BOX = """
import matplotlib.pyplot as plt
fig, (pie, box) = plt.subplots(1, 2)
fig.suptitle('Both')
pie.pie([90, 10], labels=['yes', 'no'])
box.boxplot([[1, 2, 3, 4, 5, 20]], tick_labels=['only'])
plt.show()
"""


def test_matplotlib_show_gives_png_and_line_chart(sandbox: Sandbox) -> None:
    execution = sandbox.run_code(LINE)
    assert execution.error is None
    [result] = execution.results
    assert result.png is not None
    assert base64.b64decode(result.png).startswith(PNG_MAGIC)
    assert result.text is not None
    assert not result.extra
    chart = result.chart
    assert isinstance(chart, LineChart)
    assert chart.title == "Waves"
    assert (chart.x_label, chart.x_unit) == ("Time (s)", "s")
    assert (chart.y_label, chart.y_unit) == ("Amplitude [Hz]", "Hz")
    assert chart.x_scale == "datetime"
    assert chart.y_scale == "linear"
    assert all(isinstance(tick, str) for tick in chart.x_ticks)
    assert all(isinstance(tick, float) for tick in chart.y_ticks)
    assert len(chart.x_ticks) == len(chart.x_tick_labels)
    assert [line.label for line in chart.elements] == ["sin(x)", "cos(x)"]
    first = chart.elements[0]
    assert len(first.points) == 50
    assert first.points[0][0].startswith("2023-09-01")
    assert first.points[0][1] == 0.0


def test_bar_chart(sandbox: Sandbox) -> None:
    [result] = sandbox.run_code(BAR).results
    chart = result.chart
    assert isinstance(chart, BarChart)
    assert chart.type == ChartType.BAR
    assert (chart.title, chart.x_label, chart.y_label) == ("Sales", "Author", "Books")
    assert [(b.label, b.group, b.value) for b in chart.elements] == [
        ("A", "Sold", 1),
        ("B", "Sold", 5),
        ("C", "Sold", 3),
    ]


def test_figure_as_last_expression_is_the_main_result(sandbox: Sandbox) -> None:
    execution = sandbox.run_code(FIGURE_AS_LAST_EXPRESSION)
    assert execution.error is None
    [result] = execution.results
    assert result.is_main_result
    assert result.png is not None
    chart = result.chart
    assert isinstance(chart, ScatterChart)
    assert chart.y_scale == "log"
    assert chart.elements[0].label == "dots"
    assert chart.elements[0].points == [(1.0, 3.0), (2.0, 1.0), (3.0, 2.0)]


def test_superchart_of_pie_and_box(sandbox: Sandbox) -> None:
    [result] = sandbox.run_code(PIE_AND_BOX).results
    chart = result.chart
    assert isinstance(chart, SuperChart)
    assert chart.title == "Both"
    pie, box = chart.elements
    assert isinstance(pie, PieChart)
    assert [(w.label, w.angle, w.radius) for w in pie.elements] == [("yes", 324, 1), ("no", 36, 1)]
    assert isinstance(box, BoxAndWhiskerChart)
    [stats] = box.elements
    assert stats.label == "only"
    assert (stats.min, stats.median, stats.max) == (1, 3.5, 5)
    assert stats.outliers == [20]


def test_figure_without_a_chart_is_unknown(sandbox: Sandbox) -> None:
    code = "import matplotlib.pyplot as plt\nplt.figure()\nplt.title('Empty')\nplt.show()"
    [result] = sandbox.run_code(code).results
    assert result.chart is not None
    assert result.chart.type == ChartType.UNKNOWN
    assert result.chart.title == "Empty"
    assert result.chart.elements == []


def test_dataframe_has_data(sandbox: Sandbox) -> None:
    code = (
        "import pandas as pd\n"
        "pd.DataFrame({'a': [1, 2, None], 'when': pd.to_datetime(['2024-01-01'] * 3)})"
    )
    [result] = sandbox.run_code(code).results
    assert result.is_main_result
    assert result.html is not None and "<table" in result.html
    assert result.data == {"a": [1.0, 2.0, None], "when": ["2024-01-01T00:00:00"] * 3}


def test_saving_an_image_to_a_file_also_shows_it(sandbox: Sandbox) -> None:
    """As in upstream's template: E2B's own suite expects a PNG result from ``image.save``."""
    code = (
        "import io\n"
        "from PIL import Image\n"
        "image = Image.new('RGB', (4, 4), 'red')\n"
        "image.save(io.BytesIO(), format='PNG')\n"  # a file object: not shown
        "image.save('saved.png')\n"
        "print('saved')"
    )
    execution = sandbox.run_code(code)
    assert execution.error is None
    assert execution.logs.stdout == ["saved\n"]
    [result] = execution.results
    assert result.png is not None
    assert base64.b64decode(result.png).startswith(PNG_MAGIC)
