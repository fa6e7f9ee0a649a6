package kube

import "testing"

func TestAmbientEnrolled_PodLabelWinsOverNamespace(t *testing.T) {
	amb := map[string]string{LabelDataplaneMode: DataplaneModeAmbient}
	none := map[string]string{LabelDataplaneMode: DataplaneModeNone}
	for _, tc := range []struct {
		name     string
		ns, pod  map[string]string
		enrolled bool
	}{
		{"nothing", nil, nil, false},
		{"namespace ambient", amb, nil, true},
		{"pod ambient", nil, amb, true},
		{"pod none opts out of ambient namespace", amb, none, false},
		{"pod other value keeps namespace enrollment", amb, map[string]string{LabelDataplaneMode: "sidecar"}, true},
		{"pod none without namespace", nil, none, false},
		{"namespace other value", map[string]string{LabelDataplaneMode: "x"}, nil, false},
	} {
		if got := AmbientEnrolled(tc.ns, tc.pod); got != tc.enrolled {
			t.Errorf("%s: AmbientEnrolled = %v, want %v", tc.name, got, tc.enrolled)
		}
	}
}
