"""Files of a landscape: the arrays (.npz), a surface for ParaView (.vtp) and PNG plots, all written atomically.

Plots are drawn on matplotlib ``Figure`` objects (Agg, no pyplot state). Loss surfaces are drawn up to the
95th percentile of their finite values, so a few huge losses at the grid's edge do not flatten the basin.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .._io import atomic_write, dumps, save_figure, write_text
from ..errors import HessgapError
from .result import LandscapeResult


def write_npz(result: LandscapeResult, path: str | Path) -> Path:
    """x, y, every surface, the directions, clamped variances and the settings (as JSON text)."""
    arrays = {"x": result.x, "directions": result.directions.detach().cpu().numpy()}
    if result.y is not None:
        arrays["y"] = result.y
    arrays.update(result.surfaces())
    if result.clamped_variances is not None:
        arrays["clamped_variances"] = result.clamped_variances
    arrays["settings"] = np.array(dumps(result.settings, indent=None))

    def write(handle):
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        handle.write(buffer.getvalue())

    return atomic_write(path, write)


def _ascii(values: np.ndarray, per_line: int) -> str:
    """Numbers as VTK's ascii format wants them, ``per_line`` to a line (integers print without a point)."""
    flat = [f"{v:.9g}" for v in np.asarray(values, dtype=np.float64).ravel()]
    return "\n".join("          " + " ".join(flat[i : i + per_line]) for i in range(0, len(flat), per_line))


def write_vtp(result: LandscapeResult, path: str | Path) -> Path:
    """The 2-D surfaces as VTK XML PolyData (ParaView opens it): points (x, y, train loss), one quad per grid
    cell, every surface as point data. VTK's ascii format has no NaN: a point where the loss is not finite is
    written with the worst finite value of each surface (the largest loss, the lowest accuracy)."""
    if result.y is None:
        raise HessgapError("a VTK surface needs a 2-D landscape; this one is a line (write_npz keeps it)")
    nx, ny = len(result.x), len(result.y)
    xs, ys = np.meshgrid(result.x, result.y)

    def finite(values: np.ndarray, worst) -> np.ndarray:
        ok = np.isfinite(values)
        return np.where(ok, values, worst(values[ok]) if ok.any() else 0.0)

    surfaces = {name: finite(values, np.min if name.endswith("accuracy") else np.max)
                for name, values in result.surfaces().items()}
    points = np.stack([xs.ravel(), ys.ravel(), surfaces["train_loss"].ravel()], axis=1)
    corners = [(j * nx + i, j * nx + i + 1, (j + 1) * nx + i + 1, (j + 1) * nx + i)
               for j in range(ny - 1) for i in range(nx - 1)]
    point_data = "\n".join(
        f'        <DataArray type="Float64" Name="{name}" NumberOfComponents="1" format="ascii">\n'
        f"{_ascii(values, 6)}\n        </DataArray>"
        for name, values in surfaces.items()
    )
    text = (
        '<?xml version="1.0"?>\n'
        '<VTKFile type="PolyData" version="1.0" byte_order="LittleEndian" header_type="UInt64">\n'
        "  <PolyData>\n"
        f'    <Piece NumberOfPoints="{nx * ny}" NumberOfVerts="0" NumberOfLines="0" NumberOfStrips="0" '
        f'NumberOfPolys="{len(corners)}">\n'
        f"      <PointData Scalars=\"train_loss\">\n{point_data}\n      </PointData>\n"
        "      <Points>\n"
        '        <DataArray type="Float64" Name="Points" NumberOfComponents="3" format="ascii">\n'
        f"{_ascii(points, 6)}\n        </DataArray>\n"
        "      </Points>\n"
        "      <Polys>\n"
        '        <DataArray type="Int64" Name="connectivity" format="ascii">\n'
        f"{_ascii(np.array(corners), 8)}\n        </DataArray>\n"
        '        <DataArray type="Int64" Name="offsets" format="ascii">\n'
        f"{_ascii(4 * np.arange(1, len(corners) + 1), 8)}\n        </DataArray>\n"
        "      </Polys>\n"
        "    </Piece>\n"
        "  </PolyData>\n"
        "</VTKFile>\n"
    )
    return write_text(path, text)


def _figure(width: float = 5.5, height: float = 4.2):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="tight")


def _capped(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values), 0.0, 1.0
    low, high = float(finite.min()), float(np.percentile(finite, 95))
    if not high > low:
        high = low + max(abs(low), 1.0) * 1e-3
    capped = np.where(np.isfinite(values), np.minimum(values, high), high)
    return capped, low, high


def _title(result: LandscapeResult, name: str) -> str:
    label = name.replace("_", " ")
    return f"{label} ({result.kind} directions)" if result.kind not in ("model", "models") else f"{label} between models"


def plot_2d(result: LandscapeResult, name: str, folder: str | Path) -> dict[str, Path]:
    """Contour, filled contour and 3-D surface of one surface; returns {kind: path}."""
    values, low, high = _capped(result.surfaces()[name])
    xs, ys = np.meshgrid(result.x, result.y)
    levels = np.linspace(low, high, 25)
    paths = {}
    for style in ("contour", "filled", "surface"):
        figure = _figure()
        if style == "surface":
            axes = figure.add_subplot(projection="3d")
            axes.plot_surface(xs, ys, values, cmap="viridis", linewidth=0, antialiased=True)
            axes.set_zlabel(name.replace("_", " "))
        else:
            axes = figure.add_subplot()
            if style == "contour":
                drawn = axes.contour(xs, ys, values, levels=levels, cmap="viridis")
                axes.clabel(drawn, inline=True, fontsize=7, fmt="%.3g")
            else:
                drawn = axes.contourf(xs, ys, values, levels=levels, cmap="viridis")
                figure.colorbar(drawn, ax=axes)
            axes.plot([0], [0], marker="+", color="black")
        axes.set_xlabel("x (direction 1)")
        axes.set_ylabel("y (direction 2)")
        axes.set_title(_title(result, name), fontsize=10)
        paths[style] = save_figure(figure, Path(folder) / f"{name}_{style}.png")
    return paths


def plot_1d(result: LandscapeResult, path: str | Path) -> Path:
    """Loss (left axis, log scale) and accuracy (right axis) along the line, train solid and test dashed."""
    figure = _figure(6.0, 4.0)
    axes = figure.add_subplot()
    surfaces = result.surfaces()
    for name, style in (("train_loss", "-"), ("test_loss", "--")):
        if name in surfaces:
            axes.plot(result.x, surfaces[name], style, color="tab:blue", label=name.replace("_", " "))
    if np.all(surfaces["train_loss"][np.isfinite(surfaces["train_loss"])] > 0):
        axes.set_yscale("log")
    axes.set_xlabel("α" if result.kind in ("model", "models") else "x (direction 1)")
    axes.set_ylabel("loss", color="tab:blue")
    if "train_accuracy" in surfaces:
        right = axes.twinx()
        for name, style in (("train_accuracy", "-"), ("test_accuracy", "--")):
            if name in surfaces:
                right.plot(result.x, surfaces[name], style, color="tab:red", label=name.replace("_", " "))
        right.set_ylabel("accuracy (%)", color="tab:red")
    axes.set_title(_title(result, "loss"), fontsize=10)
    axes.legend(loc="upper left", fontsize=8)
    return save_figure(figure, path)


def write_all(result: LandscapeResult, results_dir: str | Path, figures_dir: str | Path) -> dict[str, str]:
    """Every file of a landscape: npz, vtp (2-D), plots, and the result as JSON; returns {what: path}."""
    results_dir, figures_dir = Path(results_dir), Path(figures_dir)
    files = {"npz": write_npz(result, results_dir / "landscape.npz")}
    if result.dims == 2:
        files["vtp"] = write_vtp(result, results_dir / "landscape.vtp")
        for name in ("train_loss", "test_loss"):
            if name in result.surfaces():
                for style, path in plot_2d(result, name, figures_dir).items():
                    files[f"{name}_{style}"] = path
    else:
        files["line"] = plot_1d(result, figures_dir / "landscape_line.png")
    files = {key: str(path) for key, path in files.items()}
    result.files = files | {"json": str(results_dir / "landscape.json")}
    result.to_json(results_dir / "landscape.json")
    return result.files
