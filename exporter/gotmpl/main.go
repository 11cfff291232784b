// Command gotmpl renders an Ollama Modelfile TEMPLATE with Go's text/template, the engine Ollama uses.
//
// Input (stdin, JSON): {"template": "...", "data": {...}}. The data mirrors what Ollama's template package
// passes to Execute for chat templates: System, Messages (Role, Content, Thinking, ToolCalls, ToolName,
// ToolCallID), Tools, Prompt, Response, Suffix, Think, IsThinkSet. Tool-call arguments are a plain map, as Ollama
// hands them to templates since #13636 (templateArgs): a template can range over them (keys in sorted order), and
// they print as compact JSON with sorted keys. The template is parsed with
// Option("missingkey=zero") and Ollama's functions (json, currentDate, yesterdayDate). The rendered text goes to stdout.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"text/template"
	"time"
)

// orderedArgs keeps the keys of a JSON object in the order they were given (tool definitions print that way).
type orderedArgs struct {
	keys []string
	vals map[string]json.RawMessage
}

func (a *orderedArgs) UnmarshalJSON(b []byte) error {
	a.vals = map[string]json.RawMessage{}
	dec := json.NewDecoder(bytes.NewReader(b))
	if _, err := dec.Token(); err != nil {
		return err
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		key := tok.(string)
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return err
		}
		if _, seen := a.vals[key]; !seen {
			a.keys = append(a.keys, key)
		}
		a.vals[key] = raw
	}
	return nil
}

func (a orderedArgs) MarshalJSON() ([]byte, error) {
	var buf bytes.Buffer
	buf.WriteByte('{')
	for i, k := range a.keys {
		if i > 0 {
			buf.WriteByte(',')
		}
		kb, _ := json.Marshal(k)
		buf.Write(kb)
		buf.WriteByte(':')
		vb, err := marshalOrdered(a.vals[k])
		if err != nil {
			return nil, err
		}
		buf.Write(vb)
	}
	buf.WriteByte('}')
	return buf.Bytes(), nil
}

// marshalOrdered re-encodes a raw JSON value compactly, keeping object key order and Go's HTML escaping.
func marshalOrdered(raw json.RawMessage) ([]byte, error) {
	trimmed := bytes.TrimSpace(raw)
	if len(trimmed) > 0 && trimmed[0] == '{' {
		var o orderedArgs
		if err := o.UnmarshalJSON(trimmed); err != nil {
			return nil, err
		}
		return o.MarshalJSON()
	}
	if len(trimmed) > 0 && trimmed[0] == '[' {
		var items []json.RawMessage
		if err := json.Unmarshal(trimmed, &items); err != nil {
			return nil, err
		}
		var buf bytes.Buffer
		buf.WriteByte('[')
		for i, it := range items {
			if i > 0 {
				buf.WriteByte(',')
			}
			b, err := marshalOrdered(it)
			if err != nil {
				return nil, err
			}
			buf.Write(b)
		}
		buf.WriteByte(']')
		return buf.Bytes(), nil
	}
	var v any
	if err := json.Unmarshal(trimmed, &v); err != nil {
		return nil, err
	}
	return json.Marshal(v)
}

// templateArgs are a tool call's arguments as Ollama's templates see them: a map (rangeable, sorted keys) that
// prints as compact JSON.
type templateArgs map[string]any

func (a templateArgs) String() string {
	if a == nil {
		return "{}"
	}
	b, _ := json.Marshal(map[string]any(a))
	return string(b)
}

type ToolCallFunction struct {
	Index     int          `json:"index"`
	Name      string       `json:"name"`
	Arguments templateArgs `json:"arguments"`
}

type ToolCall struct {
	ID       string           `json:"id,omitempty"`
	Function ToolCallFunction `json:"function"`
}

type Message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking,omitempty"`
	ToolCalls  []ToolCall `json:"tool_calls,omitempty"`
	ToolName   string     `json:"tool_name,omitempty"`
	ToolCallID string     `json:"tool_call_id,omitempty"`
}

// Tool keeps the raw JSON of one tool and prints it compactly (Ollama's Tool.String).
type Tool struct {
	Type     string       `json:"type"`
	Function ToolFunction `json:"function"`
	raw      json.RawMessage
}

type ToolFunction struct {
	Name        string          `json:"name"`
	Description string          `json:"description"`
	Parameters  json.RawMessage `json:"parameters"`
	raw         json.RawMessage
}

func (t *Tool) UnmarshalJSON(b []byte) error {
	type alias Tool
	var a alias
	if err := json.Unmarshal(b, &a); err != nil {
		return err
	}
	*t = Tool(a)
	t.raw = append(json.RawMessage(nil), b...)
	var parts struct {
		Function json.RawMessage `json:"function"`
	}
	if err := json.Unmarshal(b, &parts); err == nil {
		t.Function.raw = parts.Function
	}
	return nil
}

func (t Tool) MarshalJSON() ([]byte, error)         { return marshalOrdered(t.raw) }
func (t Tool) String() string                       { b, _ := t.MarshalJSON(); return string(b) }
func (f ToolFunction) MarshalJSON() ([]byte, error) { return marshalOrdered(f.raw) }
func (f ToolFunction) String() string               { b, _ := f.MarshalJSON(); return string(b) }

type Input struct {
	Template string `json:"template"`
	Now      string `json:"now,omitempty"` // YYYY-MM-DD for currentDate (tests); empty: today, as Ollama does
	Data     struct {
		System     string    `json:"System"`
		Messages   []Message `json:"Messages"`
		Tools      []Tool    `json:"Tools"`
		Prompt     string    `json:"Prompt"`
		Response   string    `json:"Response"`
		Suffix     string    `json:"Suffix"`
		Think      bool      `json:"Think"`
		IsThinkSet bool      `json:"IsThinkSet"`
	} `json:"data"`
}

// funcs are Ollama's template functions: json, currentDate and yesterdayDate (YYYY-MM-DD, the format argument is
// ignored as in Ollama). toTypeScriptType is not provided: it needs Ollama's tool-property types.
func funcs(now time.Time) template.FuncMap {
	return template.FuncMap{
		"json": func(v any) string {
			b, _ := json.Marshal(v)
			return string(b)
		},
		"currentDate":   func(args ...string) string { return now.Format("2006-01-02") },
		"yesterdayDate": func(args ...string) string { return now.AddDate(0, 0, -1).Format("2006-01-02") },
	}
}

// render parses and executes one template; errors carry the stage that failed.
func render(input Input) (string, error) {
	now := time.Now()
	if input.Now != "" {
		t, err := time.Parse("2006-01-02", input.Now)
		if err != nil {
			return "", fmt.Errorf("bad now %q: %w", input.Now, err)
		}
		now = t
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs(now)).Parse(input.Template)
	if err != nil {
		return "", fmt.Errorf("template parse error: %w", err)
	}
	d := input.Data
	var tools any
	if len(d.Tools) > 0 {
		tools = d.Tools
	}
	data := map[string]any{
		"System":     d.System,
		"Messages":   d.Messages,
		"Tools":      tools,
		"Prompt":     d.Prompt,
		"Response":   d.Response,
		"Suffix":     d.Suffix,
		"Think":      d.Think,
		"IsThinkSet": d.IsThinkSet,
	}
	var out bytes.Buffer
	if err := tmpl.Execute(&out, data); err != nil {
		return "", fmt.Errorf("template execute error: %w", err)
	}
	return out.String(), nil
}

type result struct {
	Out string `json:"out"`
	Err string `json:"err,omitempty"`
}

// main reads one input object (writes the text) or a JSON array of them (writes a JSON array of results).
func main() {
	in, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "read stdin:", err)
		os.Exit(1)
	}
	trimmed := bytes.TrimSpace(in)
	if len(trimmed) > 0 && trimmed[0] == '[' {
		var inputs []Input
		if err := json.Unmarshal(trimmed, &inputs); err != nil {
			fmt.Fprintln(os.Stderr, "bad input JSON:", err)
			os.Exit(1)
		}
		results := make([]result, len(inputs))
		for i, input := range inputs {
			out, err := render(input)
			results[i] = result{Out: out}
			if err != nil {
				results[i].Err = err.Error()
			}
		}
		enc := json.NewEncoder(os.Stdout)
		enc.SetEscapeHTML(false)
		if err := enc.Encode(results); err != nil {
			os.Exit(1)
		}
		return
	}
	var input Input
	if err := json.Unmarshal(trimmed, &input); err != nil {
		fmt.Fprintln(os.Stderr, "bad input JSON:", err)
		os.Exit(1)
	}
	out, err := render(input)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(3)
	}
	os.Stdout.WriteString(out)
}
