(() => {
  "use strict";
  const table = document.getElementById("leaderboard");
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const headers = Array.from(table.tHead.rows[0].cells);
  const texts = new Map(rows.map((r) => [r, Array.from(r.cells, (c) => c.textContent).join("\n").toLowerCase()]));
  const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });
  const sortKey = (row, col) => (row.cells[col].dataset.sort ?? row.cells[col].textContent).trim();
  const isNumber = (key) => key !== "" && Number.isFinite(Number(key));

  function sortBy(col) {
    const dir = headers[col].getAttribute("aria-sort") === "ascending" ? -1 : 1;
    headers.forEach((h) => h.removeAttribute("aria-sort"));
    headers[col].setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    const current = Array.from(body.rows);
    const keys = new Map(current.map((r) => [r, sortKey(r, col)]));
    const numeric = [...keys.values()].every((k) => k === "" || isNumber(k));
    const compare = (a, b) => (numeric ? Number(a) - Number(b) : collator.compare(a, b));
    current.sort((ra, rb) => {
      const a = keys.get(ra), b = keys.get(rb);
      if (a === "" || b === "") return (a === "" ? 1 : 0) - (b === "" ? 1 : 0);  // missing last, both ways
      return dir * compare(a, b);
    });
    body.append(...current);
  }

  const filter = document.getElementById("filter");
  const selects = ["task", "model", "method"].map((name) => [name, document.getElementById("filter-" + name)]);
  const count = document.getElementById("row-count");

  function applyFilters() {
    const needle = filter.value.trim().toLowerCase();
    let shown = 0;
    for (const row of rows) {
      const keep = texts.get(row).includes(needle) &&
        selects.every(([name, select]) => select.value === "" || row.dataset[name] === select.value);
      row.hidden = !keep;
      shown += keep ? 1 : 0;
    }
    count.textContent = `${shown} of ${rows.length} rows`;
  }

  headers.forEach((th, col) => th.querySelector("button").addEventListener("click", () => sortBy(col)));
  filter.addEventListener("input", applyFilters);
  selects.forEach(([, select]) => select.addEventListener("change", applyFilters));
  applyFilters();  // the browser may restore form values on reload
})();
