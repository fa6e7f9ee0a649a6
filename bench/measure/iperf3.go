package measure

import (
	"encoding/json"
	"errors"
	"fmt"
)

// Iperf3 is the part of an `iperf3 -J` client report the benchmarks use.
type Iperf3 struct {
	// SentGbps and ReceivedGbps are the whole run's throughput over all
	// streams, as the sender and the receiver counted it.
	SentGbps, ReceivedGbps float64
	Streams                int
	Retransmits            int
}

// ParseIperf3 reads an `iperf3 -c ... -J` report. A report carrying an
// "error" (iperf3 still writes JSON when it fails) is an error.
func ParseIperf3(raw []byte) (Iperf3, error) {
	var doc struct {
		Error string `json:"error"`
		Start struct {
			TestStart struct {
				NumStreams int `json:"num_streams"`
			} `json:"test_start"`
		} `json:"start"`
		End *struct {
			SumSent *struct {
				Bps         float64 `json:"bits_per_second"`
				Retransmits int     `json:"retransmits"`
			} `json:"sum_sent"`
			SumReceived *struct {
				Bps float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return Iperf3{}, fmt.Errorf("iperf3 report: %w", err)
	}
	if doc.Error != "" {
		return Iperf3{}, fmt.Errorf("iperf3: %s", doc.Error)
	}
	if doc.End == nil || doc.End.SumSent == nil || doc.End.SumReceived == nil {
		return Iperf3{}, errors.New("iperf3 report has no end.sum_sent / end.sum_received")
	}
	r := Iperf3{
		SentGbps:     doc.End.SumSent.Bps / 1e9,
		ReceivedGbps: doc.End.SumReceived.Bps / 1e9,
		Streams:      doc.Start.TestStart.NumStreams,
		Retransmits:  doc.End.SumSent.Retransmits,
	}
	if r.ReceivedGbps <= 0 || r.ReceivedGbps != r.ReceivedGbps {
		return Iperf3{}, fmt.Errorf("iperf3 report: receiver counted %v bit/s", doc.End.SumReceived.Bps)
	}
	return r, nil
}
