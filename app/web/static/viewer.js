// Live progress on a job page: follow the job's Server-Sent Events (the browser resumes with
// Last-Event-ID by itself) and reload the page once the job has ended.
(function () {
  const panel = document.getElementById("progress");
  if (!panel || !panel.dataset.events) return;
  const finished = (counts) =>
    ["completed", "failed", "cancelled"].reduce((n, s) => n + (counts.by_status[s] || 0), 0);
  const show = (summary) => {
    const status = document.getElementById("job-status");
    status.textContent = summary.status;
    status.className = "status " + summary.status;
    document.getElementById("job-done").textContent = finished(summary.counts);
    document.getElementById("job-bar").value = finished(summary.counts);
  };
  const source = new EventSource(panel.dataset.events);
  source.addEventListener("snapshot", (event) => show(JSON.parse(event.data)));
  source.addEventListener("done", (event) => {
    source.close();
    show(JSON.parse(event.data));
    window.location.reload();
  });
})();
