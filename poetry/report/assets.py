"""The page's style and its one script, inline: the page is opened from disk, offline, with nothing beside it."""

CSS = """
* { box-sizing: border-box; }
body { margin: 0; color: #1d1d1f; background: #f6f6f4;
       font: 14px/1.45 system-ui, "Noto Sans CJK SC", "Source Han Sans SC", "Microsoft YaHei", sans-serif; }
header.top { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid #d8d8d8;
             padding: 6px 16px; display: flex; flex-wrap: wrap; gap: 4px 18px; align-items: center; }
header.top h1 { font-size: 15px; margin: 0; }
header.top fieldset { border: 0; margin: 0; padding: 0; display: inline-flex; gap: 8px; flex-wrap: wrap; }
header.top legend { float: left; color: #666; margin-right: 4px; }
#shown { color: #666; margin-left: auto; }
main { padding: 8px 16px 48px; }
section { margin: 10px 0 18px; }
h2 { font-size: 15px; margin: 0 0 6px; }
.top-row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.panel { background: #fff; border: 1px solid #e0e0e0; border-radius: 6px; padding: 8px 12px; }
table { border-collapse: collapse; }
.scores th, .scores td { padding: 1px 10px; border-bottom: 1px solid #eee; white-space: nowrap; }
.scores td { text-align: right; font-variant-numeric: tabular-nums; }
.scores th { text-align: left; font-weight: normal; }
.scores thead th { font-weight: 600; text-align: right; }
.scores tr.main th { font-weight: 600; }
.scores tbody + tbody { border-top: 2px solid #ccc; }
.up { color: #137333; } .down { color: #b3261e; }
.note { color: #666; font-size: 12px; max-width: 44em; margin: 4px 0; }
.panel .note { max-width: 38em; }
.changes { max-width: 400px; }
.changes ol { margin: 2px 0 8px; padding-left: 22px; }
.changes a { color: #0b57d0; }
.confusions { display: flex; gap: 14px; flex-wrap: wrap; }
.confusion th, .confusion td { border: 1px solid #e3e3e3; padding: 1px 7px; text-align: right; }
.confusion caption { text-align: left; font-weight: 600; }
.confusion td.same { background: #e6f4e4; }
.confusion td.empty { color: #bbb; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; background: #fff; border: 1px solid #e0e0e0; border-radius: 6px; padding: 6px 8px; }
figcaption { font-size: 12px; max-width: 420px; }
.entry { margin-left: 8px; white-space: nowrap; }
.entry i { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 3px; }
.entry i.ring { border: 2px solid #333; border-radius: 50%; background: #fff; }
svg.chart { display: block; }
svg .grid { stroke: #e6e6e6; } svg .tick { font-size: 10px; fill: #666; }
svg circle.start { fill: #fff; stroke-width: 2.5; }
article.q { background: #fff; border: 1px solid #e0e0e0; border-radius: 6px; margin: 8px 0; padding: 6px 10px;
            scroll-margin-top: 130px; content-visibility: auto; contain-intrinsic-size: auto 240px; }
article.q[hidden] { display: none; }
article.q:target { outline: 3px solid #f9ab00; }
.q h3 { font-size: 14px; margin: 0 0 4px; font-weight: 600; display: flex; flex-wrap: wrap; gap: 4px 12px; }
.q h3 a { color: #666; text-decoration: none; }
.author, .form { color: #666; font-weight: normal; }
.totals { margin-left: auto; font-weight: normal; }
.q .body { display: grid; grid-template-columns: minmax(200px, 280px) 1fr; gap: 12px; }
.poem { white-space: pre-line; color: #333; font-size: 13px; }
.opts { list-style: none; padding: 0; margin: 6px 0 0; font-size: 13px; }
.opts li { padding: 1px 4px; border-radius: 3px; }
.opts li.gold { background: #e6f4e4; }
.pick { font-size: 11px; padding: 0 4px; border-radius: 3px; margin-left: 4px; color: #fff; }
.pick.right { background: #188038; } .pick.wrong { background: #c5221f; }
.ans { width: 100%; font-size: 13px; table-layout: fixed; }
.ans th, .ans td { text-align: left; vertical-align: top; padding: 2px 6px; border-top: 1px solid #f0f0f0;
                  overflow-wrap: anywhere; }
.ans thead th { color: #666; font-weight: normal; border-top: 0; }
.ans th.key { width: 12em; font-weight: 600; }
.ans tr.sent th.key { font-weight: normal; color: #444; }
.ans tr.word + tr.sent > * { border-top: 1px solid #c8c8c8; }
.ans td.gold { background: #fafaf5; }
.missing { color: #aaa; }
.scs { white-space: nowrap; }
.sc { display: inline-block; min-width: 2.7em; margin-left: 3px; padding: 0 3px; border-radius: 3px; text-align: center;
      font: 11px/1.5 ui-monospace, monospace; }
.s0 { background: #f6d2cf; } .s1 { background: #fbe2c6; } .s2 { background: #fbf1bd; }
.s3 { background: #dcefc7; } .s4 { background: #bfe3c0; } .sn { background: #eee; }
"""

# Rows carry their keys as data attributes: data-order, data-total<i> and data-change (numbers, empty when
# missing), data-wrong (indices of the submissions that picked a wrong option), data-changed, data-form. They are read
# once: reading them in every comparison made a sort of 327 rows take a quarter of a second.
SCRIPT = """
"use strict";
(() => {
  const list = document.getElementById("questions");
  const sort = document.getElementById("sort");
  const shown = document.getElementById("shown");
  const boxes = Array.from(document.querySelectorAll("header.top input[type=checkbox]"));
  const number = (text) => (text ? Number(text) : null);
  const rows = Array.from(list.querySelectorAll("article.q"), (row) => ({
    row, order: Number(row.dataset.order), wrong: row.dataset.wrong.split(" "),
    changed: row.dataset.changed === "1", form: row.dataset.form,
  }));
  let sortedBy = "order asc";
  const reorder = () => {
    const [key, direction] = sort.value.split(" ");
    const sign = direction === "desc" ? -1 : 1;
    const keyed = rows.map((entry) => [entry, number(entry.row.dataset[key])]);
    keyed.sort(([a, x], [b, y]) => {
      const tie = a.order - b.order;
      if (x === null || y === null) return (x === null) - (y === null) || tie;  // missing values last
      return sign * (x - y) || tie;
    });
    const fragment = document.createDocumentFragment();
    keyed.forEach(([entry]) => fragment.appendChild(entry.row));
    list.appendChild(fragment);
    sortedBy = sort.value;
  };
  const visible = (entry) => boxes.every((box) => {
    const filter = box.dataset.filter;
    if (filter === "wrong") return !box.checked || entry.wrong.includes(box.value);
    if (filter === "changed") return !box.checked || entry.changed;
    return box.checked || entry.form !== box.value;
  });
  const update = () => {
    if (sort.value !== sortedBy) reorder();
    let count = 0;
    for (const entry of rows) {
      entry.row.hidden = !visible(entry);
      count += entry.row.hidden ? 0 : 1;
    }
    shown.textContent = `${count} of ${rows.length} questions`;
  };
  sort.addEventListener("change", update);
  boxes.forEach((box) => box.addEventListener("change", update));
})();
"""
