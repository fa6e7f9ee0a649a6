// Package plot renders a benchmark scenario's figures as a PNG bar chart
// (gonum.org/v1/plot): one group of bars per row, one bar colour per
// figure. It draws what it is given and measures nothing.
package plot

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"

	gplot "gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// Bars is a grouped bar chart: Groups along the x axis (the scenario's
// rows), each with one bar per Series.
type Bars struct {
	Title  string   `json:"title"`
	YLabel string   `json:"y_label"`
	Groups []string `json:"groups"`
	Series []Series `json:"series"`
}

// Series is one figure across the groups; a NaN or negative value (a row
// that did not run) draws no bar.
type Series struct {
	Name   string    `json:"name"`
	Values []float64 `json:"values"`
}

// Validate says what is wrong with the chart's shape, if anything.
func (b Bars) Validate() error {
	if len(b.Groups) == 0 || len(b.Series) == 0 {
		return errors.New("chart has no groups or no series")
	}
	for _, s := range b.Series {
		if len(s.Values) != len(b.Groups) {
			return fmt.Errorf("series %q has %d values for %d groups", s.Name, len(s.Values), len(b.Groups))
		}
	}
	return nil
}

// PNG renders the chart as a PNG image.
func (b Bars) PNG() ([]byte, error) {
	if err := b.Validate(); err != nil {
		return nil, fmt.Errorf("render %q: %w", b.Title, err)
	}
	p := gplot.New()
	p.Title.Text = b.Title
	p.Y.Label.Text = b.YLabel
	p.Y.Min = 0
	p.Legend.Top = true
	p.Legend.Left = false
	// Bars of one group sit side by side, centred on the group's tick.
	barWidth := vg.Points(math.Max(6, math.Min(28, 360/float64(len(b.Groups)*len(b.Series)))))
	for i, s := range b.Series {
		vals := make(plotter.Values, len(s.Values))
		for j, v := range s.Values {
			if v > 0 && !math.IsInf(v, 0) {
				vals[j] = v
			}
		}
		bars, err := plotter.NewBarChart(vals, barWidth)
		if err != nil {
			return nil, fmt.Errorf("render %q series %q: %w", b.Title, s.Name, err)
		}
		bars.LineStyle.Width = vg.Length(0)
		bars.Color = plotutil.Color(i)
		bars.Offset = barWidth * vg.Length(float64(i)-float64(len(b.Series)-1)/2)
		p.Add(bars)
		p.Legend.Add(s.Name, bars)
	}
	p.NominalX(b.Groups...)
	// Room on both sides for the outer groups' bars, and above the tallest
	// bar for the legend (one line per series).
	p.X.Min, p.X.Max = -0.6, float64(len(b.Groups))-0.4
	top := 0.0
	for _, s := range b.Series {
		for _, v := range s.Values {
			if v > top && !math.IsInf(v, 0) {
				top = v
			}
		}
	}
	if top > 0 {
		p.Y.Max = top * (1.08 + 0.09*float64(len(b.Series)))
	}
	width := vg.Length(math.Max(480, float64(len(b.Groups))*110)) * vg.Points(1)
	w, err := p.WriterTo(width, 4*vg.Inch, "png")
	if err != nil {
		return nil, fmt.Errorf("render %q: %w", b.Title, err)
	}
	var buf bytes.Buffer
	if _, err := w.WriteTo(&buf); err != nil {
		return nil, fmt.Errorf("render %q: %w", b.Title, err)
	}
	return buf.Bytes(), nil
}

// MarshalJSON writes a missing value (NaN, Inf) as null, which JSON can carry.
func (s Series) MarshalJSON() ([]byte, error) {
	vals := make([]*float64, len(s.Values))
	for i, v := range s.Values {
		if !math.IsNaN(v) && !math.IsInf(v, 0) {
			vals[i] = &s.Values[i]
		}
	}
	return json.Marshal(struct {
		Name   string     `json:"name"`
		Values []*float64 `json:"values"`
	}{s.Name, vals})
}

// UnmarshalJSON reads null back as NaN.
func (s *Series) UnmarshalJSON(b []byte) error {
	var raw struct {
		Name   string     `json:"name"`
		Values []*float64 `json:"values"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return err
	}
	s.Name, s.Values = raw.Name, make([]float64, len(raw.Values))
	for i, v := range raw.Values {
		s.Values[i] = math.NaN()
		if v != nil {
			s.Values[i] = *v
		}
	}
	return nil
}
