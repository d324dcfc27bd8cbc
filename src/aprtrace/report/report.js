const data = JSON.parse(document.getElementById('diff-data').textContent);
const num = function(x, d){ if (x === null || x === undefined) return '-';
  if (typeof x !== 'number') return String(x);
  if (Number.isInteger(x)) return String(x);
  return Number(x.toPrecision(d || 4)).toString(); };
const esc = function(s){ return String(s).replace(/[&<>"]/g, function(c){
  return {'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]; }); };
function render(i){
  const p = data.pairs[i];
  const first = data.first_divergence && data.first_divergence.path === p.path;
  const t = p.tolerance;
  const lines = [];
  lines.push('<b>' + esc(p.path) + '</b>  ' + esc(p.verdict.toUpperCase()) + ': ' +
    esc(p.reason || '') + (first ? '  <b>&#9664; first divergence</b>' : ''));
  lines.push('shape ' + esc((p.shape || []).join('x') || '?') + ', ' + num(p.dim_product) +
    ' values; tolerance atol ' + num(t.atol) + ', rtol ' + num(t.rtol) + ', cos-min ' +
    num(t.cos_min, 6));
  lines.push('max|d| ' + num(p.max_abs_diff) + ' at ' + esc(p.max_abs_diff_position ||
    ('index ' + p.max_abs_diff_index)) + ' (max|a| ' + num(p.max_abs_a) + ')');
  lines.push('cosine ' + num(p.cosine_sim, 7) + ', rel L2 ' + num(p.rel_l2) + ', SQNR ' +
    num(p.sqnr_db, 3) + ' dB, rms ' + num(p.rms_diff));
  lines.push('ULP max ' + num(p.ulp_max) + ', median ' + num(p.ulp_median, 10) +
    '; NaN A/B ' + num(p.nan_a) + '/' + num(p.nan_b) + ', Inf A/B ' + num(p.inf_a) + '/' +
    num(p.inf_b));
  if (p.predecessor) lines.push('x input ' + (p.attribution_source ? 'inf (input identical)' :
    num(p.attribution, 3)) + ' vs ' + esc(p.predecessor));
  if (p.lm_head) { const h = p.lm_head;
    lines.push('lm_head: top-1 ' + (h.top1_agree ? 'agrees' : 'DIFFERS') + ' (A ' + h.top1_a +
      ', B ' + h.top1_b + '), top-5 overlap ' + h.top5_overlap + '/5, KL(A||B) ' +
      num(h.kl_divergence)); }
  let html = '<pre>' + lines.join('\n') + '</pre>';
  if (p.top_diffs.length) {
    html += '<table><tr><th>index</th><th>a</th><th>b</th><th>|a-b|</th></tr>' +
      p.top_diffs.map(function(r){ return '<tr><td>' + r.index + '</td><td>' + num(r.a, 7) +
        '</td><td>' + num(r.b, 7) + '</td><td>' + num(r.abs_diff) + '</td></tr>'; }).join('') +
      '</table>';
  }
  html += '<details><summary>JSON of this pair</summary><pre>' +
    esc(JSON.stringify(p, null, 1)) + '</pre></details>';
  document.getElementById('details').innerHTML = html;
  document.querySelectorAll('.sel').forEach(function(el){ el.classList.remove('sel'); });
  document.querySelectorAll('[data-i="' + i + '"]').forEach(function(el){
    el.classList.add('sel'); });
}
let pinned = null;
document.querySelectorAll('[data-i]').forEach(function(el){
  const i = +el.dataset.i;
  el.addEventListener('click', function(){ pinned = i; render(i); });
  if (el.classList.contains('cell')) {
    el.addEventListener('mouseenter', function(){ render(i); });
    el.addEventListener('mouseleave', function(){ if (pinned !== null) render(pinned); });
  }
});
// Start on the first divergence, else on the pair with the largest relative error.
let start = data.pairs.findIndex(function(p){
  return data.first_divergence && p.path === data.first_divergence.path; });
if (start < 0) { data.pairs.forEach(function(p, i){
  if (p.rel_l2 !== null && (start < 0 || p.rel_l2 > data.pairs[start].rel_l2)) start = i; }); }
if (start >= 0) { pinned = start; render(start); }
