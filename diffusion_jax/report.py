"""workdir/report.html: one self-contained page on a training run.

The config, loss curve, sample-quality metrics over steps, throughput and the
EMA sample grids over time, read back from what the trainer wrote (config.json,
the TensorBoard event files, samples/ema_step_*.png). Images are base64 data:
URIs and there is no script or external stylesheet, so the file opens in a
browser from disk, without a server. Missing pieces are left out with a note.

  python -m diffusion_jax.report WORKDIR
"""

import argparse
import base64
import html
import io
import json
import re
import statistics

from etils import epath
import numpy as np
from PIL import Image

from diffusion_jax.visualization import line_panel

QUALITY_PREFIX = 'sample_quality/'
FLOOR_SUFFIX = '_floor'
_GRID_NAME = re.compile(r'^ema_step_(\d+)\.png$')
_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1100px;
color:#222;padding:0 16px}
h1{margin-bottom:4px} .sub,.note{color:#666} h2{border-bottom:1px solid #ddd;
padding-bottom:4px;margin-top:32px} table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 10px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0} figcaption{text-align:center;color:#444;font-size:90%}
img.grid{image-rendering:pixelated;width:256px;border:1px solid #ddd}
pre{background:#f6f6f6;padding:12px;overflow:auto;font-size:85%}
"""


def read_events(workdir: str):
  """-> ({tag: [(step, wall_time, value)] by step}, {hparam: value}) from
  the event files in workdir (clu writes scalars as tensor summaries)."""
  # Imported here: tensorboard pulls in TensorFlow, which only this needs.
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.plugins.hparams import plugin_data_pb2
  from tensorboard.util import tensor_util
  # pylint: enable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(
      str(workdir), size_guidance={'tensors': 0, 'scalars': 0})
  acc.Reload()
  tags = acc.Tags()
  scalars = {}
  for tag in tags.get('tensors', []):
    if acc.SummaryMetadata(tag).plugin_data.plugin_name != 'scalars':
      continue  # images, hparams
    scalars[tag] = [(e.step, e.wall_time,
                     float(tensor_util.make_ndarray(e.tensor_proto)))
                    for e in acc.Tensors(tag)]
  for tag in tags.get('scalars', []):  # summaries of the old scalar kind
    scalars[tag] = [(e.step, e.wall_time, e.value) for e in acc.Scalars(tag)]
  # A resumed run writes some steps twice: the later write is kept.
  scalars = {tag: sorted({s: (s, w, v) for s, w, v in events}.values())
             for tag, events in scalars.items() if events}
  hparams = {}
  try:
    content = acc.PluginTagToContent('hparams')
  except KeyError:
    content = {}
  for raw in content.values():
    info = plugin_data_pb2.HParamsPluginData.FromString(raw).session_start_info
    for key, value in info.hparams.items():
      kind = value.WhichOneof('kind')
      if kind in ('number_value', 'string_value', 'bool_value'):
        hparams[key] = getattr(value, kind)
  return scalars, hparams


def _fmt(v) -> str:
  if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
    return f'{int(v):,}'
  return f'{v:.6g}' if isinstance(v, float) else str(v)


def _hms(sec: float) -> str:
  sec = int(round(sec))
  return f'{sec // 3600}:{sec // 60 % 60:02d}:{sec % 60:02d}'


def _img(png: bytes, alt: str, cls: str = '') -> str:
  data = base64.b64encode(png).decode('ascii')
  return (f'<img{f" class={cls!r}" if cls else ""} alt="{html.escape(alt)}" '
          f'src="data:image/png;base64,{data}">')


def _panel(events, title, ylabel, logy=False) -> str:
  """A line_panel of one tag's events as an <img>; '' without a finite
  value."""
  xs = np.array([e[0] for e in events], np.float64)
  ys = np.array([e[2] for e in events], np.float64)
  logy = logy and bool(np.all(ys[np.isfinite(ys)] > 0))
  if not np.isfinite(ys).any():
    return ''
  buf = io.BytesIO()
  line_panel(xs, ys, title, 'step', ylabel + (' (log)' if logy else ''),
             logy=logy).save(buf, format='PNG')
  return _img(buf.getvalue(), f'{title} over steps')


def _table(rows, header=None) -> str:
  out = ['<table>']
  if header:
    out.append('<tr>' + ''.join(f'<th>{html.escape(h)}</th>'
                                for h in header) + '</tr>')
  for row in rows:
    out.append('<tr>' + ''.join(
        f'<td class="num">{html.escape(_fmt(c))}</td>' if k else
        f'<th>{html.escape(str(c))}</th>' for k, c in enumerate(row)) +
               '</tr>')
  return '\n'.join(out + ['</table>'])


def _note(text: str) -> str:
  return f'<p class="note">{html.escape(text)}</p>'


def _summary(scalars, hparams) -> str:
  rows = []
  if scalars:
    rows.append(('final step', float(max(ev[-1][0]
                                          for ev in scalars.values()))))
  if 'loss' in scalars:
    rows.append(('final loss', scalars['loss'][-1][2]))
  for tag in ('steps_per_sec', 'images_per_sec'):
    if tag in scalars:
      rows.append((f'{tag.replace("_per_", "/")} (median over the run)',
                   statistics.median(e[2] for e in scalars[tag])))
  for key in ('num_params', 'batch_size', 'num_devices'):
    if key in hparams:
      rows.append((key.replace('num_', 'number of ').replace('_', ' '),
                   hparams[key]))
  times = [e[1] for ev in scalars.values() for e in ev]
  if len(times) > 1:
    rows.append(('wall time, first to last logged value (h:mm:ss)',
                 _hms(max(times) - min(times))))
  for tag in sorted(scalars):
    if tag.startswith(QUALITY_PREFIX):
      rows.append((f'final {tag}', scalars[tag][-1][2]))
  return _table(rows) if rows else _note('No scalars were logged.')


def _quality(scalars) -> str:
  tags = sorted(t for t in scalars if t.startswith(QUALITY_PREFIX))
  out = []
  for tag in tags:
    floor = tag + FLOOR_SUFFIX
    if tag.endswith(FLOOR_SUFFIX) and tag[:-len(FLOOR_SUFFIX)] in scalars:
      continue  # shown beside its metric
    name = tag[len(QUALITY_PREFIX):]
    header, rows = ['step', name], [(e[0], e[2]) for e in scalars[tag]]
    if floor in scalars:
      by_step = {e[0]: e[2] for e in scalars[floor]}
      header.append(f'{name}{FLOOR_SUFFIX}')
      rows = [(s, v, by_step.get(s, float('nan'))) for s, v in rows]
    out.append(f'<h3>{html.escape(tag)}</h3><div class="row">'
               f'{_panel(scalars[tag], name, name)}'
               f'{_table(rows, header)}</div>')
  return ('\n'.join(out) if out else
          _note(f'No {QUALITY_PREFIX}* metrics were logged '
                '(config.sample_quality.every_steps was 0?).'))


def _grids(workdir: epath.Path) -> str:
  found = []
  samples = workdir / 'samples'
  if samples.is_dir():
    for path in samples.iterdir():
      match = _GRID_NAME.match(path.name)
      if match:
        found.append((int(match.group(1)), path))
  if not found:
    return _note('No samples/ema_step_*.png grids were written.')
  figures = [f'<figure>{_img(p.read_bytes(), f"EMA samples, step {s}", "grid")}'
             f'<figcaption>step {s:,}</figcaption></figure>'
             for s, p in sorted(found)]
  return '<div class="row">\n' + '\n'.join(figures) + '\n</div>'


def _title(workdir: epath.Path, config: dict) -> tuple[str, str]:
  def get(*keys):
    d = config
    for k in keys:
      d = d.get(k) if isinstance(d, dict) else None
    return d
  parts = [('method', get('method')), ('process', get('diffusion', 'process')),
           ('data', get('data', 'name') or get('data', 'source')),
           ('model', get('model', 'name'))]
  sub = ', '.join(f'{k} {v}' for k, v in parts if v)
  return f'Training report: {workdir.name}', sub


def build_html(workdir: str) -> str:
  """The page for workdir as a string (write_report writes it)."""
  workdir = epath.Path(workdir)
  config_path, config, config_text = workdir / 'config.json', {}, None
  if config_path.exists():
    config_text = config_path.read_text()
    try:
      config = json.loads(config_text)
      config_text = json.dumps(config, indent=2, sort_keys=True)
    except ValueError:
      pass  # shown as written
  scalars, hparams = read_events(workdir)
  title, sub = _title(workdir, config)
  body = [f'<h1>{html.escape(title)}</h1>',
          f'<p class="sub">{html.escape(sub)}<br>{html.escape(str(workdir))}'
          '</p>', '<h2>Summary</h2>', _summary(scalars, hparams),
          '<h2>Loss</h2>']
  body.append(_panel(scalars['loss'], 'training loss', 'loss', logy=True)
              if 'loss' in scalars else _note('No loss was logged.'))
  if 'learning_rate' in scalars:
    body.append(_panel(scalars['learning_rate'], 'learning rate', 'lr'))
  body += ['<h2>Sample quality</h2>', _quality(scalars), '<h2>Throughput</h2>']
  panels = [_panel(scalars[t], t.replace('_per_', '/'), t.replace('_per_', '/'))
            for t in ('steps_per_sec', 'images_per_sec') if t in scalars]
  body.append(f'<div class="row">{"".join(panels)}</div>' if panels else
              _note('No throughput was logged.'))
  body += ['<h2>Samples over time</h2>', _grids(workdir), '<h2>Config</h2>']
  body.append(f'<details><summary>config.json</summary><pre>'
              f'{html.escape(config_text)}</pre></details>'
              if config_text is not None else _note('No config.json.'))
  return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          f'<title>{html.escape(title)}</title><style>{_STYLE}</style></head>'
          '<body>\n' + '\n'.join(body) + '\n</body></html>\n')


def write_report(workdir: str) -> str:
  """Writes workdir/report.html (local or gs://); returns its path."""
  path = epath.Path(workdir) / 'report.html'
  path.write_text(build_html(workdir))
  return str(path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdir')
  print(write_report(parser.parse_args(argv).workdir))


if __name__ == '__main__':
  main()
