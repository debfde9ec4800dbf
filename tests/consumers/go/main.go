// sescheck decodes SES payloads into aws-lambda-go's event structs.
//
// Input on stdin: a JSON array of payloads, each a Lambda event ({"Records":
// ...}) or an SNS notification ({"notificationType": ...}).  Output on stdout:
// a JSON array with, for each payload, the decoding error (a JSON type that
// does not fit a declared field, a timestamp that is not RFC 3339), the
// fields it has that the structs do not declare ("unknown", compared with the
// exact spelling: Go's decoder would also take another case), and the
// declared fields without omitempty that it lacks ("missing": Go would zero
// them silently).  Go ignores unknown fields when decoding; listing them is
// what lets the caller hold every extra field to a known list.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"reflect"
	"sort"
	"strings"
	"time"

	"mxrules/sescheck/events"
)

// notification wraps the structs aws-lambda-go declares for `mail` and
// `receipt` the way an SNS notification carries them.
type notification struct {
	NotificationType string                    `json:"notificationType"`
	Mail             events.SimpleEmailMessage `json:"mail"`
	Receipt          events.SimpleEmailReceipt `json:"receipt"`
	Content          string                    `json:"content,omitempty"`
}

type result struct {
	Error   string   `json:"error"`
	Unknown []string `json:"unknown"`
	Missing []string `json:"missing"`
}

var timeType = reflect.TypeOf(time.Time{})

func main() {
	var payloads []json.RawMessage
	if err := json.NewDecoder(os.Stdin).Decode(&payloads); err != nil {
		fmt.Fprintln(os.Stderr, "sescheck: input:", err)
		os.Exit(2)
	}
	out := make([]result, 0, len(payloads))
	for _, raw := range payloads {
		out = append(out, check(raw))
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "sescheck: output:", err)
		os.Exit(2)
	}
}

func check(raw json.RawMessage) result {
	var generic map[string]interface{}
	if err := json.Unmarshal(raw, &generic); err != nil {
		return result{Error: err.Error()}
	}
	var target interface{} = &notification{}
	if _, ok := generic["Records"]; ok {
		target = &events.SimpleEmailEvent{}
	}
	res := result{Unknown: []string{}, Missing: []string{}}
	if err := json.Unmarshal(raw, target); err != nil {
		res.Error = err.Error()
	}
	walk("", generic, reflect.TypeOf(target).Elem(), &res)
	sort.Strings(res.Unknown)
	sort.Strings(res.Missing)
	return res
}

func walk(path string, value interface{}, t reflect.Type, res *result) {
	switch t.Kind() {
	case reflect.Struct:
		if t == timeType {
			return
		}
		obj, ok := value.(map[string]interface{})
		if !ok {
			return // a type error, reported by Unmarshal
		}
		seen := map[string]bool{}
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name, omit := tag(f)
			seen[name] = true
			v, present := obj[name]
			if !present {
				if !omit {
					res.Missing = append(res.Missing, join(path, name))
				}
				continue
			}
			walk(join(path, name), v, f.Type, res)
		}
		for key := range obj {
			if !seen[key] {
				res.Unknown = append(res.Unknown, join(path, key))
			}
		}
	case reflect.Slice:
		items, ok := value.([]interface{})
		if !ok {
			return
		}
		for _, item := range items {
			walk(path+"[]", item, t.Elem(), res)
		}
	}
}

func tag(f reflect.StructField) (string, bool) {
	parts := strings.Split(f.Tag.Get("json"), ",")
	name := parts[0]
	if name == "" {
		name = f.Name
	}
	for _, p := range parts[1:] {
		if p == "omitempty" {
			return name, true
		}
	}
	return name, false
}

func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}
