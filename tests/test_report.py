"""report.html: a fake work directory written the way the trainer writes one
(clu's writer, save_png grids, config.json), checked as a DOM and, where
Chromium is installed, as a page rendered headless."""

import base64
import html.parser
import io
import json
import os
import subprocess

import numpy as np
from PIL import Image
import pytest

from configs import default
from diffusion_jax import report, visualization

CHROMIUM = '/usr/bin/chromium'
LOSS = {10: 0.9, 20: 0.5, 30: 0.3, 40: 0.2, 50: 0.123456789}
EVIL = '<script>alert(1)</script>&"'  # a config value that must be escaped


class Dom(html.parser.HTMLParser):
  """Headings, table rows, <img> attributes and the <pre> text of a page."""

  def __init__(self, text):
    super().__init__()
    self.headings, self.rows, self.imgs, self.pre = [], [], [], ''
    self.tags, self._stack = [], []
    self.feed(text)

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, dict(attrs)))
    if tag == 'img':
      self.imgs.append(dict(attrs))
      return
    if tag == 'tr':
      self.rows.append([])
    if tag in ('td', 'th') and self.rows:
      self.rows[-1].append('')
    self._stack.append(tag)

  def handle_endtag(self, tag):
    if tag in self._stack:
      while self._stack.pop() != tag:
        pass

  def handle_data(self, data):
    if not self._stack:
      return
    top = self._stack[-1]
    if top in ('h1', 'h2', 'h3'):
      self.headings.append(data.strip())
    elif top in ('td', 'th') and self.rows:
      self.rows[-1][-1] += data
    elif top == 'pre':
      self.pre += data


def png_of(src: str) -> Image.Image:
  prefix = 'data:image/png;base64,'
  assert src.startswith(prefix), src[:40]
  img = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):])))
  img.load()
  assert img.format == 'PNG'
  return img


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp('run')
  config = default.get_config()
  config.data.data_dir = EVIL
  (path / 'config.json').write_text(config.to_json_best_effort(indent=2))
  writer = metric_writers.create_default_writer(str(path))
  writer.write_hparams({'num_params': 123456, 'batch_size': 64,
                        'num_devices': 1})
  for step, loss in LOSS.items():
    writer.write_scalars(step, {'loss': loss, 'learning_rate': 1e-4 * step,
                                'steps_per_sec': 10.0 + step / 10,
                                'images_per_sec': 640.0 + step * 6.4})
  for step in (20, 50):
    writer.write_scalars(step, {'sample_quality/classifier_fd': 100 / step,
                                'sample_quality/classifier_fd_floor': 0.4,
                                'sample_quality/fid': 300 / step})
  writer.write_images(50, {'ema_samples': np.zeros((1, 8, 8, 1), np.uint8)})
  writer.flush()
  writer.close()
  rng = np.random.default_rng(0)
  sizes = {}  # step -> (width, height) of its PNG
  for step, shape in ((50, (19, 37, 1)), (20, (19, 19, 1))):
    saved = visualization.save_png(
        str(path / 'samples' / f'ema_step_{step:08d}.png'),
        rng.integers(0, 256, shape, dtype=np.uint8))
    sizes[step] = Image.open(saved).size
  return path, sizes


@pytest.fixture(scope='module')
def page(workdir):
  path = report.write_report(str(workdir[0]))
  assert path == str(workdir[0] / 'report.html')
  with open(path, encoding='utf-8') as f:
    return f.read()


def test_report_dom_has_summary_curves_grids_and_config(workdir, page):
  _, sizes = workdir
  dom = Dom(page)
  assert dom.headings[0] == f'Training report: {workdir[0].name}'
  for h in ('Summary', 'Loss', 'Sample quality', 'Throughput',
            'Samples over time', 'Config', 'sample_quality/classifier_fd',
            'sample_quality/fid'):
    assert h in dom.headings, (h, dom.headings)
  # The floor is a column beside its metric, not a panel of its own.
  assert 'sample_quality/classifier_fd_floor' not in dom.headings
  summary = {r[0]: r[1] for r in dom.rows if len(r) == 2}
  assert float(summary['final loss']) == pytest.approx(LOSS[50], rel=1e-5)
  assert summary['final step'] == '50'
  assert summary['number of params'] == '123,456'
  assert float(summary['steps/sec (median over the run)']) == pytest.approx(
      13.0)
  assert ['step', 'classifier_fd', 'classifier_fd_floor'] in dom.rows
  alts = [i['alt'] for i in dom.imgs]
  assert 'training loss over steps' in alts
  assert 'classifier_fd over steps' in alts
  grids = [i for i in dom.imgs if i['alt'].startswith('EMA samples')]
  assert [g['alt'] for g in grids] == ['EMA samples, step 20',
                                      'EMA samples, step 50']
  for g, step in zip(grids, (20, 50)):
    assert png_of(g['src']).size == sizes[step]
  for i in dom.imgs:
    png_of(i['src'])  # every image is an embedded PNG
  assert json.loads(dom.pre)['data']['data_dir'] == EVIL
  assert EVIL not in page and '<script' not in page
  # Nothing to fetch: no URL in any src/href, no script or stylesheet link.
  assert not any(k in ('src', 'href') and not v.startswith('data:')
                 for _, attrs in dom.tags for k, v in attrs.items())
  assert 'src="http' not in page and 'url(' not in page
  assert not {t for t, _ in dom.tags} & {'script', 'link', 'iframe'}


def test_report_of_a_bare_workdir_notes_what_is_missing(tmp_path, capsys):
  report.main([str(tmp_path)])
  assert capsys.readouterr().out.strip() == str(tmp_path / 'report.html')
  page = (tmp_path / 'report.html').read_text()
  for note in ('No loss was logged', 'No sample_quality/* metrics',
               'No samples/ema_step_*.png grids', 'No config.json'):
    assert note in page
  assert '<img' not in page


def _chromium(report_path, tmp_path, *args):
  cmd = [CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu',
         '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync',
         f'--user-data-dir={tmp_path / "profile"}', *args,
         f'file://{report_path}']
  return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                        check=True, env={**os.environ, 'HOME': str(tmp_path)})


def test_report_renders_in_headless_chromium(workdir, page, tmp_path):
  del page  # written
  if not os.path.exists(CHROMIUM):
    pytest.skip(f'{CHROMIUM} is not installed')
  path = workdir[0] / 'report.html'
  shot = tmp_path / 'shot.png'
  _chromium(path, tmp_path, f'--screenshot={shot}', '--window-size=1200,2000')
  img = Image.open(shot)
  assert img.size == (1200, 2000)
  pixels = np.asarray(img.convert('L'), np.float32)
  assert pixels.std() > 20, pixels.std()  # not one blank colour
  if os.environ.get('REPORT_SCREENSHOT'):  # to look at it
    img.save(os.environ['REPORT_SCREENSHOT'])
  dom = _chromium(path, tmp_path, '--dump-dom').stdout
  for h in ('<h1>Training report:', '<h2>Summary</h2>',
            '<h2>Samples over time</h2>', '<h2>Config</h2>'):
    assert h in dom, h
