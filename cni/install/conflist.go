package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

// extensions a runtime reads CNI configs from, as libcni.ConfFiles does.
var extensions = []string{".conf", ".conflist", ".json"}

// orderedKeys fixes the order of a conflist's top-level keys when it is
// written back: the usual ones first, plugins last, the rest sorted.
func orderedKeys(m map[string]json.RawMessage) []string {
	first := []string{"cniVersion", "cniVersions", "name", "disableCheck", "disableGC"}
	var keys []string
	seen := map[string]bool{}
	for _, k := range first {
		if _, ok := m[k]; ok {
			keys = append(keys, k)
			seen[k] = true
		}
	}
	var rest []string
	for k := range m {
		if !seen[k] && k != "plugins" {
			rest = append(rest, k)
		}
	}
	sort.Strings(rest)
	keys = append(keys, rest...)
	if _, ok := m["plugins"]; ok {
		keys = append(keys, "plugins")
	}
	return keys
}

// encodeObject writes m as indented JSON with keys in orderedKeys order.
func encodeObject(m map[string]json.RawMessage) ([]byte, error) {
	var b bytes.Buffer
	b.WriteString("{\n")
	keys := orderedKeys(m)
	for i, k := range keys {
		kb, _ := json.Marshal(k)
		var v bytes.Buffer
		if err := json.Indent(&v, m[k], "  ", "  "); err != nil {
			return nil, fmt.Errorf("re-encode %q: %w", k, err)
		}
		fmt.Fprintf(&b, "  %s: %s", kb, v.Bytes())
		if i < len(keys)-1 {
			b.WriteByte(',')
		}
		b.WriteByte('\n')
	}
	b.WriteString("}\n")
	return b.Bytes(), nil
}

func pluginType(raw json.RawMessage) string {
	var p struct {
		Type string `json:"type"`
	}
	if json.Unmarshal(raw, &p) != nil {
		return ""
	}
	return p.Type
}

// ChainInto adds entry (a plugin object whose type is pluginType) to the end
// of a conflist's plugins, or replaces an existing entry of that type in
// place (dropping duplicates). It returns the new file, and whether anything
// changed. A single-plugin .conf (isList false) becomes a conflist holding
// that plugin, then entry.
func ChainInto(data []byte, isList bool, entry json.RawMessage, typ string) ([]byte, bool, error) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(data, &top); err != nil {
		return nil, false, fmt.Errorf("parse CNI config: %w", err)
	}
	if top == nil {
		return nil, false, errors.New("CNI config is not a JSON object")
	}
	var plugins []json.RawMessage
	if isList {
		raw, ok := top["plugins"]
		if !ok {
			return nil, false, errors.New("conflist has no plugins")
		}
		if err := json.Unmarshal(raw, &plugins); err != nil {
			return nil, false, fmt.Errorf("parse conflist plugins: %w", err)
		}
	} else {
		// A .conf is one plugin; cniVersion and name move up to the list.
		list := map[string]json.RawMessage{}
		for _, k := range []string{"cniVersion", "name"} {
			if v, ok := top[k]; ok {
				list[k] = v
			}
		}
		plugin := map[string]json.RawMessage{}
		for k, v := range top {
			if k != "cniVersion" && k != "name" {
				plugin[k] = v
			}
		}
		pb, err := json.Marshal(plugin)
		if err != nil {
			return nil, false, err
		}
		plugins = []json.RawMessage{pb}
		top = list
	}
	var compactEntry bytes.Buffer
	if err := json.Compact(&compactEntry, entry); err != nil {
		return nil, false, fmt.Errorf("plugin entry: %w", err)
	}
	changed := !isList
	var out []json.RawMessage
	placed := false
	for _, p := range plugins {
		if pluginType(p) != typ {
			out = append(out, p)
			continue
		}
		if placed {
			changed = true // a duplicate goes
			continue
		}
		placed = true
		var cur bytes.Buffer
		if err := json.Compact(&cur, p); err != nil || !sameJSON(cur.Bytes(), compactEntry.Bytes()) {
			changed = true
		}
		out = append(out, compactEntry.Bytes())
	}
	if !placed {
		out = append(out, compactEntry.Bytes())
		changed = true
	}
	if !changed {
		return data, false, nil
	}
	pl, err := json.Marshal(out)
	if err != nil {
		return nil, false, err
	}
	top["plugins"] = pl
	b, err := encodeObject(top)
	if err != nil {
		return nil, false, err
	}
	if _, err := libcni.NetworkConfFromBytes(b); err != nil {
		return nil, false, fmt.Errorf("chained conflist would be invalid: %w", err)
	}
	return b, true, nil
}

// Unchain removes every plugin of type typ from a conflist. A .conf or a
// file without our entry comes back unchanged.
func Unchain(data []byte, typ string) ([]byte, bool, error) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(data, &top); err != nil {
		return nil, false, fmt.Errorf("parse CNI config: %w", err)
	}
	raw, ok := top["plugins"]
	if !ok {
		return data, false, nil
	}
	var plugins []json.RawMessage
	if err := json.Unmarshal(raw, &plugins); err != nil {
		return nil, false, fmt.Errorf("parse conflist plugins: %w", err)
	}
	var out []json.RawMessage
	for _, p := range plugins {
		if pluginType(p) != typ {
			out = append(out, p)
		}
	}
	if len(out) == len(plugins) {
		return data, false, nil
	}
	if len(out) == 0 {
		return nil, false, errors.New("conflist holds only our plugin; not leaving an empty chain")
	}
	pl, err := json.Marshal(out)
	if err != nil {
		return nil, false, err
	}
	top["plugins"] = pl
	b, err := encodeObject(top)
	if err != nil {
		return nil, false, err
	}
	return b, true, nil
}

func sameJSON(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	xa, _ := json.Marshal(x)
	ya, _ := json.Marshal(y)
	return bytes.Equal(xa, ya)
}

// Primary returns the network configuration a runtime uses: the lexically
// first file in dir with a CNI extension that parses.
func Primary(dir string) (string, error) {
	files, err := libcni.ConfFiles(dir, extensions)
	if err != nil {
		return "", fmt.Errorf("list CNI configs in %s: %w", dir, err)
	}
	sort.Strings(files)
	var errs []error
	for _, f := range files {
		if err := load(f); err != nil {
			errs = append(errs, err)
			continue
		}
		return f, nil
	}
	if len(errs) == 0 {
		return "", fmt.Errorf("no CNI config in %s yet", dir)
	}
	return "", fmt.Errorf("no valid CNI config in %s: %w", dir, errors.Join(errs...))
}

func isList(path string) bool { return strings.HasSuffix(path, ".conflist") }

// load checks that path is a config a runtime would use.
func load(path string) error {
	if isList(path) {
		if _, err := libcni.NetworkConfFromFile(path); err != nil {
			return fmt.Errorf("load %s: %w", filepath.Base(path), err)
		}
		return nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read %s: %w", filepath.Base(path), err)
	}
	if _, err := libcni.NetworkPluginConfFromBytes(b); err != nil {
		return fmt.Errorf("load %s: %w", filepath.Base(path), err)
	}
	return nil
}
