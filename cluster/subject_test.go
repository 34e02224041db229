package cluster

import (
	"slices"
	"strings"
	"testing"
)

func TestTopicEncodingRoundTrip(t *testing.T) {
	for _, topic := range []string{
		"devices/dev-a/telemetry", "a.b/c*d/e>f", "with space/ü/tab\t", "/leading", "trailing/", "a//b", "",
		"$SYS/x", "_/__/_41", "a-b_c", "🙂",
	} {
		s := EncodeTopic(topic)
		if strings.ContainsAny(s, "*> \t") || strings.Contains(s, "..") || strings.HasPrefix(s, ".") || strings.HasSuffix(s, ".") {
			t.Errorf("%q encodes to an invalid subject %q", topic, s)
		}
		back, err := DecodeTopic(s)
		if err != nil || back != topic {
			t.Errorf("%q -> %q -> %q, %v", topic, s, back, err)
		}
	}
	if EncodeTopic("a.b") == EncodeTopic("a/b") {
		t.Error("'.' inside a level collides with the level separator")
	}
}

func FuzzTopicEncoding(f *testing.F) {
	f.Add("devices/a.b/c")
	f.Fuzz(func(t *testing.T, topic string) {
		back, err := DecodeTopic(EncodeTopic(topic))
		if err != nil || back != topic {
			t.Fatalf("%q -> %q, %v", topic, back, err)
		}
	})
}

func TestFilterSubjects(t *testing.T) {
	for filter, want := range map[string][]string{
		"devices/+/telemetry": {"devices.*.telemetry"},
		"devices/a/#":         {"devices.a", "devices.a.>"},
		"#":                   {">"},
		"+/#":                 {"*", "*.>"},
		"a.b/+":               {"a_2Eb.*"},
	} {
		if got := FilterSubjects(filter); !slices.Equal(got, want) {
			t.Errorf("%q: %v, want %v", filter, got, want)
		}
	}
}

func TestDecodeRejectsGarbage(t *testing.T) {
	for _, s := range []string{"a_", "a_4", "a_ZZ", "a_4g", "a.b*"} {
		if _, err := DecodeTopic(s); err == nil {
			t.Errorf("%q decoded", s)
		}
	}
}
