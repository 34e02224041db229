package sim

import (
	"encoding/json"
	"fmt"
	"html/template"
	"io"
	"strings"
)

// WriteHTML writes a self-contained page: summary, connections over time,
// and the connect and end-to-end latency histograms, as inline SVG.
func WriteHTML(w io.Writer, r *Report) error {
	raw, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return page.Execute(w, map[string]any{
		"R":        r,
		"Timeline": template.HTML(lineChart(r.Timeline)),
		"Connect":  template.HTML(barChart(r.ConnectHistogram, "connect time (ms)")),
		"E2E":      template.HTML(barChart(r.E2EHistogram, "end-to-end latency (ms)")),
		"JSON":     string(raw),
	})
}

const chartW, chartH, pad = 640.0, 240.0, 40.0

func lineChart(pts []Point) string {
	if len(pts) == 0 {
		return "<p>no data</p>"
	}
	maxT, maxY := pts[len(pts)-1].T, 1
	for _, p := range pts {
		maxY = max(maxY, p.Connected)
	}
	if maxT <= 0 {
		maxT = 1
	}
	var path strings.Builder
	for i, p := range pts {
		x := pad + p.T/maxT*(chartW-2*pad)
		y := chartH - pad - float64(p.Connected)/float64(maxY)*(chartH-2*pad)
		if i == 0 {
			fmt.Fprintf(&path, "M%.1f %.1f", x, y)
		} else {
			fmt.Fprintf(&path, " L%.1f %.1f", x, y)
		}
	}
	return fmt.Sprintf(`<svg viewBox="0 0 %.0f %.0f" width="%.0f" height="%.0f" role="img" aria-label="connections over time">
%s<path d="%s" fill="none" stroke="#2563eb" stroke-width="2"/>
<text x="%.0f" y="%.0f" font-size="12">%d</text><text x="%.0f" y="%.0f" font-size="12" text-anchor="end">%.1f s</text></svg>`,
		chartW, chartH, chartW, chartH, axes("time (s)", "connected"), path.String(), 4.0, pad, maxY, chartW-pad, chartH-pad+16, maxT)
}

func barChart(b []Bucket, label string) string {
	if len(b) == 0 {
		return "<p>no data</p>"
	}
	maxC := 1
	for _, x := range b {
		maxC = max(maxC, x.Count)
	}
	bw := (chartW - 2*pad) / float64(len(b))
	var bars strings.Builder
	for i, x := range b {
		h := float64(x.Count) / float64(maxC) * (chartH - 2*pad)
		fmt.Fprintf(&bars, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="#16a34a"><title>%.3f–%.3f ms: %d</title></rect>`,
			pad+float64(i)*bw+1, chartH-pad-h, bw-2, h, x.From, x.To, x.Count)
	}
	return fmt.Sprintf(`<svg viewBox="0 0 %.0f %.0f" width="%.0f" height="%.0f" role="img" aria-label="%s">
%s%s<text x="%.0f" y="%.0f" font-size="12">%d</text><text x="%.0f" y="%.0f" font-size="12" text-anchor="end">%.1f ms</text></svg>`,
		chartW, chartH, chartW, chartH, label, axes(label, "count"), bars.String(), 4.0, pad, maxC, chartW-pad, chartH-pad+16, b[len(b)-1].To)
}

func axes(x, y string) string {
	return fmt.Sprintf(`<line x1="%.0f" y1="%.0f" x2="%.0f" y2="%.0f" stroke="#555"/><line x1="%.0f" y1="%.0f" x2="%.0f" y2="%.0f" stroke="#555"/>
<text x="%.0f" y="%.0f" font-size="12" text-anchor="middle">%s</text><text x="12" y="%.0f" font-size="12" transform="rotate(-90 12 %.0f)" text-anchor="middle">%s</text>`,
		pad, chartH-pad, chartW-pad, chartH-pad, pad, pad, pad, chartH-pad, chartW/2, chartH-8, template.HTMLEscapeString(x), chartH/2, chartH/2, template.HTMLEscapeString(y))
}

var page = template.Must(template.New("report").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>devsim report</title>
<style>body{font-family:system-ui,sans-serif;max-width:720px;margin:2em auto;color:#111}
table{border-collapse:collapse}td,th{padding:2px 10px;text-align:right;border-bottom:1px solid #ddd}
th:first-child,td:first-child{text-align:left}pre{background:#f4f4f5;padding:1em;overflow:auto;font-size:12px}</style></head>
<body><h1>devsim report</h1>
<table>
<tr><td>devices</td><td>{{.R.Devices}}</td></tr>
<tr><td>enrolled</td><td>{{.R.Enrolled}} in {{printf "%.1f" .R.EnrollSeconds}} s</td></tr>
<tr><td>connected</td><td>{{.R.Connected}} in {{printf "%.1f" .R.ConnectSeconds}} s ({{printf "%.0f" .R.ConnectRate}}/s)</td></tr>
<tr><td>messages sent / received (sample)</td><td>{{.R.MessagesSent}} / {{.R.MessagesReceived}}</td></tr>
<tr><td>errors</td><td>{{range $k, $v := .R.Errors}}{{$k}}: {{$v}}<br>{{else}}none{{end}}</td></tr>
</table>
{{with .R.Server}}<h2>Broker (from /proc)</h2>
<table>
<tr><td>CPU per connect</td><td>{{printf "%.2f" .CPUPerConnect}} ms</td></tr>
<tr><td>CPU during the connect phase / traffic</td><td>{{printf "%.0f" .CPUConnectMS}} ms / {{printf "%.0f" .CPUTrafficMS}} ms</td></tr>
<tr><td>RSS per session</td><td>{{printf "%.1f" .RSSPerSession}} KiB</td></tr>
<tr><td>RSS before / connected</td><td>{{.RSSBeforeKB}} KiB / {{.RSSIdleKB}} KiB</td></tr>
</table>{{end}}
<h2>Latency (ms)</h2>
<table><tr><th></th><th>p50</th><th>p90</th><th>p99</th><th>max</th><th>n</th></tr>
<tr><td>connect</td><td>{{.R.ConnectMS.P50}}</td><td>{{.R.ConnectMS.P90}}</td><td>{{.R.ConnectMS.P99}}</td><td>{{.R.ConnectMS.Max}}</td><td>{{.R.ConnectMS.N}}</td></tr>
<tr><td>end to end</td><td>{{.R.E2EMS.P50}}</td><td>{{.R.E2EMS.P90}}</td><td>{{.R.E2EMS.P99}}</td><td>{{.R.E2EMS.Max}}</td><td>{{.R.E2EMS.N}}</td></tr></table>
<h2>Connections over time</h2>{{.Timeline}}
<h2>Connect time</h2>{{.Connect}}
<h2>End-to-end latency</h2>{{.E2E}}
<h2>Raw report</h2><pre>{{.JSON}}</pre>
</body></html>
`))
