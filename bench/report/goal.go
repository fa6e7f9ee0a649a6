package report

import (
	"fmt"
	"math"
)

// Goal is one bar from the issue a figure is held to: Value against Bound,
// where AtMost flips "at least" into "under".
type Goal struct {
	What   string  // "ztunnel h2 / best peer pair (1 stream)"
	Value  float64 // the measured figure
	Bound  float64
	AtMost bool
	Unit   string // printed after both numbers ("x", " ms", " MB")
	// Missing, when set, says why there is no figure (the row could not
	// run); such a goal is neither met nor missed.
	Missing string
}

// Met reports whether the figure clears the bar. A goal without a figure
// (Missing, or a NaN/Inf value) is not met.
func (g Goal) Met() bool {
	if g.Missing != "" || math.IsNaN(g.Value) || math.IsInf(g.Value, 0) {
		return false
	}
	if g.AtMost {
		return g.Value < g.Bound
	}
	return g.Value >= g.Bound
}

// Verdict is "met", "missed" or "not measured".
func (g Goal) Verdict() string {
	switch {
	case g.Missing != "" || math.IsNaN(g.Value) || math.IsInf(g.Value, 0):
		return "not measured"
	case g.Met():
		return "met"
	default:
		return "missed"
	}
}

// String is the goal as a line of RESULTS.md:
// "ztunnel h2 / no mesh at least 0.35x: 0.52x, met".
func (g Goal) String() string {
	rel := "at least"
	if g.AtMost {
		rel = "under"
	}
	head := fmt.Sprintf("%s %s %s%s", g.What, rel, trim(g.Bound), g.Unit)
	if g.Missing != "" {
		return head + ": not measured (" + g.Missing + ")"
	}
	return fmt.Sprintf("%s: %s%s, %s", head, trim(g.Value), g.Unit, g.Verdict())
}

// trim prints a figure with 3 significant digits.
func trim(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return fmt.Sprint(v)
	}
	return fmt.Sprintf("%.3g", v)
}

// Ratio is a/b, NaN when either is missing (zero, negative, NaN), so a
// ratio to a row that did not run never looks like a figure.
func Ratio(a, b float64) float64 {
	if !(a > 0) || !(b > 0) || math.IsInf(a, 0) || math.IsInf(b, 0) {
		return math.NaN()
	}
	return a / b
}

// Fmt prints v with the given decimals, or "n/a" for NaN.
func Fmt(v float64, decimals int) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "n/a"
	}
	return fmt.Sprintf("%.*f", decimals, v)
}
