"""The DDPM bound as a report: its terms, rate and distortion, and curves.

From the data-set means of likelihood.vlb_terms' per-image arrays, as in
DDPM sec. 4.3 and Fig. 5.
"""

from etils import epath
import numpy as np
from PIL import Image

from diffusion_jax.visualization import line_panel


def summarize(mean: dict, num_timesteps: int) -> dict:
  """Data-set means of likelihood.vlb_terms' arrays -> the figures of
  metrics.json (the total and its standard error are the eval mode's)."""
  terms = mean['terms_bpd']
  # Rate after x_t is received (t = i + 1): L_T + sum_{j > i} L_j; the
  # distortion is the RMSE of x0_hat(x_t) on the 0..255 scale (DDPM sec. 4.3,
  # Fig. 5). The last entry of the rate misses only L_0.
  rate = float(mean['prior_bpd']) + np.concatenate(
      [np.cumsum(terms[::-1])[::-1][1:], [0.0]])
  return {
      'prior_bpd': float(mean['prior_bpd']),
      'decoder_bpd': float(terms[0]),
      'kl_terms_bpd': float(terms[1:].sum()),
      'terms_bpd': [float(v) for v in terms],
      'rate_bpd': [float(v) for v in rate],
      'distortion_rmse': [float(v) for v in
                          np.sqrt(mean['x0_mse']) * 127.5],
      'num_timesteps': num_timesteps,
  }


def plot_curves(metrics: dict, path: str) -> str:
  """Three panels: the per-term bound L_{t-1} vs t (log y), the cumulative
  rate after x_t is received, and distortion vs rate (DDPM sec. 4.3)."""
  terms, rate = metrics['terms_bpd'], metrics['rate_bpd']
  t = np.arange(1, len(terms) + 1)  # column i is L_{t-1} with t = i + 1
  total = metrics['total_bpd']
  panels = [
      line_panel(t, terms, f'L_(t-1), bits/dim (total {total:.3f})', 't',
                 'bits/dim (log)', logy=True),
      line_panel(t, rate, 'rate after receiving x_t', 't', 'bits/dim'),
      line_panel(rate, metrics['distortion_rmse'], 'distortion vs rate',
                 'rate (bits/dim)', 'RMSE [0, 255]'),
  ]
  width, height = panels[0].size
  out = Image.new('RGB', (width * len(panels), height), 'white')
  for k, p in enumerate(panels):
    out.paste(p, (k * width, 0))
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    out.save(f, format='PNG')
  return str(path)
