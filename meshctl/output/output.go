// Package output prints meshctl's results as an aligned text table, JSON or
// YAML (-o table|json|yaml). It owns formatting only: callers hand it
// headers and rows for tables, and any JSON-taggable value for json/yaml.
package output

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"sigs.k8s.io/yaml"
)

// Format is an output format.
type Format string

const (
	Table Format = "table"
	JSON  Format = "json"
	YAML  Format = "yaml"
)

// ParseFormat checks an -o value ("" means table).
func ParseFormat(s string) (Format, error) {
	switch Format(s) {
	case "", Table:
		return Table, nil
	case JSON, YAML:
		return Format(s), nil
	}
	return "", fmt.Errorf("unknown output format %q: want table, json or yaml", s)
}

// WriteTable prints rows under headers, columns separated by at least
// three spaces, as kubectl aligns them. An empty cell prints as "-" so
// columns stay parseable by whitespace.
func WriteTable(w io.Writer, headers []string, rows [][]string) error {
	tw := tabwriter.NewWriter(w, 0, 8, 3, ' ', 0)
	fmt.Fprintln(tw, strings.Join(headers, "\t"))
	for _, r := range rows {
		cells := make([]string, len(r))
		for i, c := range r {
			if c == "" {
				c = "-"
			}
			// A tab or newline in a value would break the layout.
			cells[i] = strings.NewReplacer("\t", " ", "\n", " ").Replace(c)
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	return tw.Flush()
}

// WriteData prints v as indented JSON or as YAML.
func WriteData(w io.Writer, f Format, v any) error {
	switch f {
	case JSON:
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	case YAML:
		b, err := yaml.Marshal(v)
		if err != nil {
			return fmt.Errorf("encode yaml: %w", err)
		}
		_, err = w.Write(b)
		return err
	}
	return fmt.Errorf("format %q is not a data format", f)
}
