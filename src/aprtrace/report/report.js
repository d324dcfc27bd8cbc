// aprtrace diff report: details of the selected pair, table sorting and filtering.
// The data is the page's aprtrace-diff-v1 document (script#diff-data); nothing is fetched.
const data = JSON.parse(document.getElementById('diff-data').textContent);
const tokens = data.token_texts;  // text of each prompt token, or null without a tokenizer
const num = function(x, d){ if (x === null || x === undefined) return '-';
  if (typeof x !== 'number') return String(x);
  if (Number.isInteger(x)) return String(x);
  return Number(x.toPrecision(d || 4)).toString(); };
const sci = function(x){ if (x === null || x === undefined) return '-';
  return x === 0 ? '0' : x.toExponential(1); };
const esc = function(s){ return String(s).replace(/[&<>"]/g, function(c){
  return {'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]; }); };
// Named coordinates -> 'token 3 "+", channel 121'; token texts come from the tokenizer.
function where(coords, index){
  if (!coords) return 'index ' + index;
  return Object.keys(coords).map(function(name){
    let text = name + ' ' + coords[name];
    if ((name === 'token' || name === 'query' || name === 'key') && tokens &&
        coords[name] < tokens.length) text += ' ' + JSON.stringify(tokens[coords[name]]);
    return text; }).join(', ');
}
function topLogits(list){
  return list.map(function(t){ return t.id + (t.text !== null ? ' ' + JSON.stringify(t.text) : '') +
    ' (' + num(t.logit, 4) + ')'; }).join(', ');
}
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
  if (p.max_abs_diff) lines.push('max|d| ' + num(p.max_abs_diff) + ' at ' +
    esc(where(p.max_abs_diff_coords, p.max_abs_diff_index)) + ' (max|a| ' + num(p.max_abs_a) + ')');
  else if (p.max_abs_diff === 0) lines.push('identical (max|d| 0)');
  const gap = p.cosine_sim === null ? null : (p.max_abs_diff === 0 ? 0 : Math.max(0, 1 - p.cosine_sim));
  lines.push('1 - cosine ' + sci(gap) + ', rel L2 ' + num(p.rel_l2) + ', SQNR ' +
    (p.sqnr_db === null ? '-' : num(p.sqnr_db, 3) + ' dB') + ', rms ' + num(p.rms_diff));
  lines.push('||A|| ' + num(p.norm_a) + ', ||B|| ' + num(p.norm_b) + '; ULP max ' +
    num(p.ulp_max) + ', median ' + num(p.ulp_median, 10) + '; NaN A/B ' + num(p.nan_a) + '/' +
    num(p.nan_b) + ', Inf A/B ' + num(p.inf_a) + '/' + num(p.inf_b));
  if (p.predecessor) lines.push('x input ' + (p.attribution_source ? 'new (input identical)' :
    num(p.attribution, 3)) + ' vs ' + esc(p.predecessor));
  if (p.input_note) lines.push('x input unknown: ' + esc(p.input_note));
  if (p.lm_head) { const h = p.lm_head;
    lines.push('lm_head: top-1 ' + (h.top1_agree ? 'agrees' : 'DIFFERS') + ', top-5 overlap ' +
      h.top5_overlap + '/5, KL(A||B) ' + num(h.kl_divergence));
    lines.push('  top-5 A: ' + esc(topLogits(h.top_a)));
    lines.push('  top-5 B: ' + esc(topLogits(h.top_b))); }
  let out = '<pre>' + lines.join('\n') + '</pre>';
  if (p.top_diffs.length) {
    out += '<table><tr><th>index</th><th class=l>where</th><th>a</th><th>b</th><th>|a-b|</th>' +
      '</tr>' + p.top_diffs.map(function(r){ return '<tr><td>' + r.index + '</td><td class=l>' +
        esc(where(r.coords, r.index)) + '</td><td>' + num(r.a, 7) + '</td><td>' + num(r.b, 7) +
        '</td><td>' + num(r.abs_diff) + '</td></tr>'; }).join('') + '</table>';
  }
  out += '<details><summary>JSON of this pair</summary><pre>' +
    esc(JSON.stringify(p, null, 1)) + '</pre></details>';
  const details = document.getElementById('details');
  details.innerHTML = out;
  details.dataset.path = p.path;
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
// Table: the failures-only filter and sorting by any column (click again to reverse).
const body = document.querySelector('#pairs tbody');
const filter = document.getElementById('only-failures');
function applyFilter(){
  let shown = 0;
  body.querySelectorAll('tr').forEach(function(tr){
    const hide = filter.checked && !tr.classList.contains('fail');
    tr.style.display = hide ? 'none' : '';
    if (!hide) shown++; });
  document.getElementById('row-count').textContent = shown + ' of ' + data.pairs.length +
    ' rows shown';
  document.querySelectorAll('.cell').forEach(function(el){
    const p = data.pairs[+el.dataset.i];
    el.classList.toggle('dim', filter.checked && p.verdict === 'pass'); });
}
filter.addEventListener('change', applyFilter);
let sortState = {col: null, dir: 1};
document.querySelectorAll('#pairs th').forEach(function(th){
  th.addEventListener('click', function(){
    const col = +th.dataset.col, numeric = th.dataset.kind === 'n';
    sortState = {col: col, dir: sortState.col === col ? -sortState.dir : 1};
    const rows = Array.from(body.querySelectorAll('tr'));
    rows.sort(function(a, b){
      const x = a.children[col].dataset.v, y = b.children[col].dataset.v;
      if (x === y) return (+a.dataset.i - +b.dataset.i);
      if (x === '') return 1;  // empty (no value) last either way
      if (y === '') return -1;
      const c = numeric ? (parseFloat(x) - parseFloat(y)) : (x < y ? -1 : 1);
      return sortState.dir * c; });
    rows.forEach(function(r){ body.appendChild(r); });
    document.querySelectorAll('#pairs th').forEach(function(h){
      h.classList.remove('asc', 'desc'); });
    th.classList.add(sortState.dir > 0 ? 'asc' : 'desc'); });
});
applyFilter();
// Start on the first divergence, else on the pair with the largest relative error.
let start = data.pairs.findIndex(function(p){
  return data.first_divergence && p.path === data.first_divergence.path; });
if (start < 0) { data.pairs.forEach(function(p, i){
  if (p.rel_l2 !== null && (start < 0 || p.rel_l2 > data.pairs[start].rel_l2)) start = i; }); }
if (start >= 0) { pinned = start; render(start); }
