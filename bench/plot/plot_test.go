package plot

import (
	"bytes"
	"encoding/json"
	"image"
	"image/png"
	"math"
	"testing"
)

func TestBarsPNG_DecodesAsPNGWithBarsDrawn(t *testing.T) {
	b := Bars{
		Title: "l4-throughput", YLabel: "Gbit/s",
		Groups: []string{"no mesh", "ztunnel h2", "ztunnel QUIC", "ghostunnel"},
		Series: []Series{{Name: "1 stream", Values: []float64{9, 4, 2, math.NaN()}}, {Name: "8 streams", Values: []float64{12, 5, 3, 2}}},
	}
	raw, err := b.PNG()
	if err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("not a PNG: %v", err)
	}
	if img.Bounds().Dx() < 400 || img.Bounds().Dy() < 200 {
		t.Fatalf("image is %v, too small to read", img.Bounds())
	}
	// The chart must have coloured (bar) pixels, not only black text on white.
	if n := colouredPixels(img); n < 500 {
		t.Fatalf("only %d coloured pixels: no bars drawn", n)
	}
}

func TestBarsPNG_RejectsMismatchedSeries(t *testing.T) {
	for name, b := range map[string]Bars{
		"no groups":    {Series: []Series{{Name: "a", Values: []float64{1}}}},
		"no series":    {Groups: []string{"a"}},
		"short series": {Groups: []string{"a", "b"}, Series: []Series{{Name: "s", Values: []float64{1}}}},
	} {
		if _, err := b.PNG(); err == nil {
			t.Errorf("%s: rendered without error", name)
		}
	}
}

func colouredPixels(img image.Image) int {
	n := 0
	r := img.Bounds()
	for y := r.Min.Y; y < r.Max.Y; y++ {
		for x := r.Min.X; x < r.Max.X; x++ {
			cr, cg, cb, _ := img.At(x, y).RGBA()
			hi, lo := max(cr, cg, cb), min(cr, cg, cb)
			if hi-lo > 0x2000 {
				n++
			}
		}
	}
	return n
}

func TestSeriesJSON_MissingValueRoundTripsAsNull(t *testing.T) {
	raw, err := json.Marshal(Series{Name: "p99", Values: []float64{1.5, math.NaN()}})
	if err != nil {
		t.Fatal(err)
	}
	if string(raw) != `{"name":"p99","values":[1.5,null]}` {
		t.Fatalf("got %s", raw)
	}
	var back Series
	if err := json.Unmarshal(raw, &back); err != nil || back.Values[0] != 1.5 || !math.IsNaN(back.Values[1]) {
		t.Fatalf("got %+v, %v", back, err)
	}
}
